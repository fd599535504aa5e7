//! Device records and their name index ([`super::DEVICES`], [`super::DEVICE_NAMES`]).
//!
//! A device and its name change together: storing a device (new, edited or renamed) and
//! removing one are each one transaction over both trees, so the name index never
//! points at a missing device nor lets two devices share a name.

use sled::Transactional;
use sled::transaction::{TransactionError, abort};
use uuid::Uuid;

use super::{DEVICE_NAMES, DEVICES, Store, StoreError, decode, encode};
use crate::device::Device;

/// What [`DeviceRecords::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Stored,
    /// Another device has the name; nothing was stored.
    NameTaken,
}

/// The stored devices.
#[derive(Clone)]
pub struct DeviceRecords {
    devices: sled::Tree,
    names: sled::Tree,
}

impl DeviceRecords {
    pub fn open(store: &Store) -> Result<DeviceRecords, StoreError> {
        Ok(DeviceRecords {
            devices: store.open_tree(DEVICES)?,
            names: store.open_tree(DEVICE_NAMES)?,
        })
    }

    /// Every device, in id order.
    pub fn list(&self) -> Result<Vec<Device>, StoreError> {
        self.devices
            .iter()
            .map(|r| {
                let (k, bytes) = r?;
                decode(&k, &bytes)
            })
            .collect()
    }

    pub fn get(&self, id: Uuid) -> Result<Option<Device>, StoreError> {
        match self.devices.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(decode(id.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    /// The id the name index gives `name`.
    pub fn id_of(&self, name: &str) -> Result<Option<Uuid>, StoreError> {
        Ok(self
            .names
            .get(name.as_bytes())?
            .and_then(|b| Uuid::from_slice(&b).ok()))
    }

    /// Stores `dev` and, when its name is new or changed from `old_name`, its name index
    /// entry, atomically.
    pub fn put(&self, old_name: Option<&str>, dev: &Device) -> Result<Put, StoreError> {
        let bytes = encode(dev);
        let id = dev.id;
        let new_name = dev.name.as_str();
        let r = (&self.devices, &self.names).transaction(|(devices, names)| {
            if old_name != Some(new_name) {
                if names.get(new_name.as_bytes())?.is_some() {
                    return abort(());
                }
                if let Some(o) = old_name {
                    names.remove(o.as_bytes())?;
                }
                names.insert(new_name.as_bytes(), id.as_bytes().to_vec())?;
            }
            devices.insert(id.as_bytes(), bytes.clone())?;
            Ok(())
        });
        match r {
            Ok(()) => Ok(Put::Stored),
            Err(TransactionError::Abort(())) => Ok(Put::NameTaken),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Removes a device and its name index entry, atomically.
    pub fn remove(&self, id: Uuid, name: &str) -> Result<(), StoreError> {
        (&self.devices, &self.names)
            .transaction(|(devices, names)| {
                devices.remove(id.as_bytes())?;
                names.remove(name.as_bytes())?;
                Ok(())
            })
            .map_err(|e: TransactionError<()>| match e {
                TransactionError::Storage(s) => StoreError::from(s),
                TransactionError::Abort(()) => unreachable!("removing never aborts"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceKind, SshAuth};

    #[test]
    fn a_device_written_in_the_existing_encoding_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut dev = Device::blank(DeviceKind::Ssh, "web1");
        dev.host = Some("10.0.0.5".into());
        dev.user = Some("ops".into());
        dev.auth = Some(SshAuth::Agent);
        // As earlier versions wrote it: JSON under the id's bytes, the name → id bytes.
        store
            .tree("devices")
            .unwrap()
            .insert(dev.id.as_bytes(), serde_json::to_vec(&dev).unwrap())
            .unwrap();
        store
            .tree("device_names")
            .unwrap()
            .insert("web1", dev.id.as_bytes().to_vec())
            .unwrap();
        let records = DeviceRecords::open(&store).unwrap();
        assert_eq!(records.id_of("web1").unwrap(), Some(dev.id));
        assert_eq!(records.get(dev.id).unwrap().as_ref(), Some(&dev));
        assert_eq!(records.list().unwrap(), [dev.clone()]);
        // And what it writes is that encoding.
        let mut renamed = dev.clone();
        renamed.name = "web2".into();
        assert_eq!(records.put(Some("web1"), &renamed).unwrap(), Put::Stored);
        let raw = store
            .tree("devices")
            .unwrap()
            .get(dev.id.as_bytes())
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Device>(&raw.unwrap()).unwrap(),
            renamed
        );
        assert_eq!(records.id_of("web1").unwrap(), None);
        let other = Device::blank(DeviceKind::Local, "web2");
        assert_eq!(records.put(None, &other).unwrap(), Put::NameTaken);
        records.remove(renamed.id, "web2").unwrap();
        assert!(records.list().unwrap().is_empty());
        assert_eq!(records.id_of("web2").unwrap(), None);
    }
}
