# akidb-embed: the sidecar with MLX's CPU backend (Debian's OpenBLAS) and the embedded
# default model. Build: `make image` (docker or podman). The steps are in
# scripts/image-install.sh, which `make image-check` also runs in a clean Debian root.
#
#   docker run -d -v akidb-embed-sock:/run/akidb-embed -v akidb-embed-models:/var/cache/akidb-embed akidb-embed:0.1.0
#   docker exec <container> akidb-embed embed "hello world"
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS build
COPY scripts/image-install.sh /usr/local/sbin/image-install.sh
COPY . /src
RUN image-install.sh build /src

FROM ${DEBIAN_IMAGE}
COPY scripts/image-install.sh /usr/local/sbin/image-install.sh
RUN image-install.sh runtime
COPY --from=build /opt/akidb-embed /opt/akidb-embed
ENV PATH=/opt/akidb-embed/bin:$PATH \
    AKIDB_EMBED_SOCKET=/run/akidb-embed/embed.sock \
    HF_HOME=/var/cache/akidb-embed/huggingface \
    PYTHONDONTWRITEBYTECODE=1
# The socket, for the database container; pulled models, to survive restarts.
VOLUME ["/run/akidb-embed", "/var/cache/akidb-embed"]
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["akidb-embed", "health", "--timeout", "3"]
ENTRYPOINT ["akidb-embed"]
CMD ["serve", "--log-format", "json"]
