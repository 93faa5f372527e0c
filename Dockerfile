# Multi-stage build: compile in the Rust image, run from a slim Debian with only the binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin topichub

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home topichub \
    && mkdir /data && chown topichub /data
COPY --from=build /src/target/release/topichub /usr/local/bin/topichub
USER topichub
# Inside a container the broker must listen on all interfaces to be reachable.
ENV TOPICHUB_LISTEN=0.0.0.0:8080 \
    RUST_LOG=info
EXPOSE 8080
ENTRYPOINT ["topichub"]
CMD ["serve"]
