# qga-bridge in front of a real QEMU guest running qga-agent.
#
# Targets: `bridge` (the host service), `guest` (QEMU + guest image), `e2e` (the
# end-to-end scenario). docker-compose.yml wires them together. On machines that cannot
# pull images, ./scripts/base-images first builds the two FROM images locally from
# Debian's packages under these names, so this file builds unchanged.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev libvirt-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The bridge, qgactl and the scenario as usual; the agent statically linked for the initramfs.
RUN cargo build --release --locked -p qga-bridge --bin qga-bridge -p qgactl --bin qgactl \
      -p qga-e2e --bin qga-e2e-scenario \
 && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
      --target x86_64-unknown-linux-gnu -p qga-agent --bin qga-agent \
 && mkdir -p /out \
 && cp target/release/qga-bridge target/release/qgactl target/release/qga-e2e-scenario \
       target/x86_64-unknown-linux-gnu/release/qga-agent /out/

# The guest image: Debian's cloud kernel and a busybox initramfs with both agents.
FROM debian:bookworm-slim AS guest-image
RUN apt-get update \
 && apt-get install -y --no-install-recommends busybox-static cpio qemu-guest-agent xz-utils zstd util-linux \
 && rm -rf /var/cache/apt/archives/*.deb
COPY tests/guest /src/tests/guest
COPY --from=build /out/qga-agent /out/qga-agent
RUN QGA_AGENT_BIN=/out/qga-agent /src/tests/guest/build-image /guest \
 && rm -rf /guest/kernel-*

FROM debian:bookworm-slim AS guest
RUN apt-get update \
 && apt-get install -y --no-install-recommends qemu-system-x86 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY --from=guest-image /guest /guest
COPY tests/guest/run-qemu /usr/local/bin/run-qemu
VOLUME /run/guest
CMD ["run-qemu"]

FROM debian:bookworm-slim AS bridge
# libvirt's client library: the bridge links it for its libvirt backend (--libvirt).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY --from=build /out/qga-bridge /out/qgactl /usr/local/bin/
# Not root: a member of the group (10001) the guest's sockets and the TLS key belong to.
# Its state directory (the journal of request-ids) is its own; compose keeps it in a volume.
RUN groupadd --system --gid 10001 qga \
 && useradd --system --uid 10001 --gid qga --no-create-home --shell /usr/sbin/nologin qga-bridge \
 && install -d -o qga-bridge -g qga -m 0700 /var/lib/qga-bridge
USER qga-bridge:qga
EXPOSE 50051 8080 9100
ENTRYPOINT ["qga-bridge"]
# compose/bridge.toml: mutual TLS, grants; certificates from ./scripts/dev-certs.
CMD ["--config", "/etc/qga-bridge/bridge.toml"]

FROM debian:bookworm-slim AS e2e
COPY --from=build /out/qga-e2e-scenario /out/qgactl /usr/local/bin/
ENTRYPOINT ["qga-e2e-scenario"]
