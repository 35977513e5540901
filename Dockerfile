# syntax=docker/dockerfile:1
# Two images from one build: `docker build --target operator .` and `--target sidecar .`.
# The build stage runs the same `make release-static` as a developer machine (static musl
# binaries, aws-lc compiled with musl-gcc); the images hold nothing but that binary.

FROM docker.io/library/rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make release-static

# distroless static: CA certificates, /etc/passwd with nonroot (65532), no shell, no libc.
FROM gcr.io/distroless/static-debian12:nonroot AS operator
COPY --from=build --chmod=0555 /src/dist/keybroker-operator /keybroker-operator
USER 65532:65532
ENTRYPOINT ["/keybroker-operator"]

FROM gcr.io/distroless/static-debian12:nonroot AS sidecar
COPY --from=build --chmod=0555 /src/dist/keybroker-sidecar /keybroker-sidecar
USER 65532:65532
ENTRYPOINT ["/keybroker-sidecar"]
