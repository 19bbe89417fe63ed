# An image whose ENTRYPOINT is start.sh: the same set-up and the same
# `exec supervisor run` that the Quick start and tests/e2e/test_image_path.py use.
FROM python:3.11-slim

WORKDIR /app
COPY . /app
# Set up at build time, exactly as a first ./start.sh would.
RUN ./start.sh --install-only

# FC sends traffic to this port (FC_SERVER_PORT overrides ca_port).
ENV FC_SERVER_PORT=9000 \
    SUPERVISOR_RUN_DIR=/tmp/ca-supervisor
EXPOSE 9000 9464

# Your functions: copy them and a supervisor.toml into /app (or set
# SUPERVISOR_CONFIG); without one the bundled example runs.
ENTRYPOINT ["/app/start.sh"]
