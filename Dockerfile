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

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs && echo 'fn main() {}' > benches/image_service.rs \
 && cargo build --release --locked --bin ecr-image-service || true
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin ecr-image-service

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/ecr-image-service /usr/local/bin/ecr-image-service
USER nonroot:nonroot
# gRPC, and the admin port with /metrics.
EXPOSE 50051 9090
# No shell for a probe script: the binary asks its own gRPC health service.
HEALTHCHECK CMD ["/usr/local/bin/ecr-image-service", "health-check"]
ENTRYPOINT ["/usr/local/bin/ecr-image-service"]
CMD ["serve"]
