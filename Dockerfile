# A minimal, non-root image with no shell: the static-ish Rust binary on distroless/cc (glibc
# and CA certificates only). Not built in CI: there is no Docker engine on the build machines.
#
#   docker build -t ecr-image-service .
#   docker run --rm -p 50051:50051 -p 9090:9090 -e AWS_REGION=us-east-1 ecr-image-service
#   docker run --rm -p 50051:50051 -v images:/data ecr-image-service \
#     serve --backend local --data-dir /data
#
# The entrypoint is the binary and the command its subcommand, so the Helm chart's args
# (`serve …`, and `health-check …` in the helm test pod) select what runs.

# Base images are pinned by digest, so a rebuild gets the bytes that were reviewed; the tag says
# which line it is. To move to a newer build: `docker buildx imagetools inspect IMAGE:TAG`, and
# replace the digest (tests/chart.rs checks that every FROM carries one).
FROM rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && for b in image_service hostile fleet h2load; do echo 'fn main() {}' > benches/$b.rs; done \
 && cargo build --release --locked --bin ecr-image-service || true
COPY src src
COPY benches benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin ecr-image-service

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=build /src/target/release/ecr-image-service /usr/local/bin/ecr-image-service
USER nonroot:nonroot
# gRPC, and the admin port with /metrics.
EXPOSE 50051 9090
# No shell for a probe script: the binary asks its own gRPC health service.
HEALTHCHECK CMD ["/usr/local/bin/ecr-image-service", "health-check"]
ENTRYPOINT ["/usr/local/bin/ecr-image-service"]
CMD ["serve"]
