# Capstan's container image: the engine (`capstan serve`) as a non-root user, its data in
# a volume, a health check on /healthz. Build it from a checkout:
#
#   docker build -t capstan .
#
# Stages. `build` starts from RUST_IMAGE (default rust:1-bookworm) and compiles the
# release binary (`cargo build --release --locked --bin capstan`) and the example plugins
# (autoheal, redeploy, inventory, crashloop, updates) for wasm32-wasip2. The runtime stage starts
# from BASE_IMAGE (default debian:bookworm-slim) and takes only the binary and the
# plugins (staged as /usr/share/capstan/plugins/<name>/{plugin.toml,<name>.wasm}, the
# layout `capstan serve --default-plugins` installs from).
#
# Prebuilt parts instead of compiling: when the context holds `dist/capstan` (a release
# binary built for the runtime base's glibc, e.g. on Debian bookworm), the build stage
# copies it and compiles nothing; `dist/plugins/<name>/{plugin.toml,<name>.wasm}` likewise
# replaces the plugin build. Then RUST_IMAGE needs no Rust at all (only /bin/sh), so an
# image can be built with no registry in reach:
#
#   docker build --build-arg RUST_IMAGE=my/debian:bookworm \
#                --build-arg BASE_IMAGE=my/debian:bookworm -t capstan CONTEXT
#
# (scripts/image does this with a Debian base made by debootstrap; dist/ is ignored by
# git). The classic builder builds every stage before the target, so the build stage is
# kept cheap when dist/ is there.
#
# Running it (see examples/compose/):
#   - runs as uid/gid 10001 (`capstan`); to reach a mounted Docker socket, add the
#     socket's group: `group_add: ["<gid of /var/run/docker.sock>"]` in compose,
#     `--group-add` with docker run;
#   - data (database, vault, compile cache, the CLI token) in the volume
#     /var/lib/capstan; nothing else is written but /tmp, so it runs with
#     `read_only: true` and a tmpfs on /tmp, `cap_drop: [ALL]` and
#     `security_opt: [no-new-privileges:true]`;
#   - the API listens on 0.0.0.0:7878 (CAPSTAN_API_LISTEN); 2375 is the conventional
#     port of a [[proxy]] entry; the health check asks GET /healthz on 127.0.0.1 at the
#     port of CAPSTAN_API_LISTEN (set that variable, not [api] listen, when you move it);
#   - on first start `capstan serve` creates the vault (key file
#     /var/lib/capstan/vault.key, or CAPSTAN_VAULT_KEY_FILE, e.g. a Compose secret),
#     registers the mounted socket as device `local` and prints the admin API token
#     once (`docker logs`). Set CAPSTAN_DEFAULT_PLUGINS=/usr/share/capstan/plugins to
#     install the example plugins on that first start.

ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
# Marks this stage's images, so tools can prune what is left of them (scripts/image does).
LABEL org.capstan.image.stage=build
COPY . /src
RUN set -eu; \
    cd /src; \
    plugins="autoheal redeploy inventory crashloop updates"; \
    mkdir -p /out/plugins; \
    if [ -f dist/capstan ]; then \
        echo "using the prebuilt dist/capstan"; \
        cp dist/capstan /out/capstan; \
    else \
        cargo build --release --locked --bin capstan; \
        cp target/release/capstan /out/capstan; \
    fi; \
    if [ -d dist/plugins ]; then \
        echo "using the prebuilt dist/plugins"; \
        cp -R dist/plugins/. /out/plugins/; \
    else \
        rustup target add wasm32-wasip2; \
        set --; for p in $plugins; do set -- "$@" -p "$p"; done; \
        cargo build --locked --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release "$@"; \
        for p in $plugins; do \
            mkdir -p "/out/plugins/$p"; \
            cp "plugins/examples/$p/plugin.toml" "/out/plugins/$p/plugin.toml"; \
            cp "plugins/target/wasm32-wasip2/release/$p.wasm" "/out/plugins/$p/$p.wasm"; \
        done; \
    fi; \
    chmod 0755 /out/capstan; \
    chmod -R a+rX,go-w /out/plugins

FROM ${BASE_IMAGE}
# Everything but the binary and plugins comes first, so a rebuild with a new binary
# redoes only the two COPY steps at the end.
RUN groupadd --system --gid 10001 capstan \
 && useradd --system --uid 10001 --gid capstan --home-dir /var/lib/capstan \
      --no-create-home --shell /usr/sbin/nologin capstan \
 && mkdir -p /var/lib/capstan /etc/capstan \
 && chown capstan:capstan /var/lib/capstan \
 && chmod 0700 /var/lib/capstan
ENV CAPSTAN_DATA_DIR=/var/lib/capstan \
    CAPSTAN_API_LISTEN=0.0.0.0:7878
VOLUME /var/lib/capstan
WORKDIR /var/lib/capstan
EXPOSE 7878 2375
USER capstan:capstan
# No curl in a slim base: bash's /dev/tcp asks the API's open /healthz route.
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${CAPSTAN_API_LISTEN##*:} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r -t 4 _ code _ <&3 && [ \"$code\" = 200 ]"]
ENTRYPOINT ["/usr/local/bin/capstan"]
CMD ["serve"]
COPY --from=build /out/capstan /usr/local/bin/capstan
COPY --from=build /out/plugins /usr/share/capstan/plugins
