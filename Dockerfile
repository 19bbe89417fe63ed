# The product image: ca-supervisor installed from its wheel, nothing else.
#
#   docker build -t ca-supervisor .          (or: podman build -t ca-supervisor .)
#   docker run --rm -p 9000:9000 -p 9464:9464 ca-supervisor
#
# Stage 1 builds the wheel from the sources (.dockerignore lets only what the
# wheel is made of into the build). Stage 2 is a slim runtime with that wheel
# installed into a virtualenv, /opt/ca-supervisor, on PATH: no tests, no bench,
# no .git, no editable install. tests/e2e/test_image_path.py follows the same
# steps without a Docker engine (build the wheel, install it into a fresh venv,
# run from outside the checkout).
#
# At run time, `supervisor run` (PID 1, exec form: it receives SIGTERM itself)
# takes its config from, in order: arguments after the image name
# (`--config FILE`), $SUPERVISOR_CONFIG, ./supervisor.toml in the working
# directory /app, else the bundled example (examples/hello). A function image
# is built FROM this one: see examples/image/.
#
# Environment: FC_SERVER_PORT (set below; FC sets it too) is the CA port,
# SUPERVISOR_METRICS_PORT the metrics port (0 disables metrics; the config's
# metrics_port, 9464 in the bundled example, otherwise), SUPERVISOR_CONFIG the
# config file, SUPERVISOR_RUN_DIR the run directory (sockets, state).

FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
# Only the build backend (hatchling) comes from the registry here.
RUN python -m pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /dist .


FROM python:3.11-slim
ENV VIRTUAL_ENV=/opt/ca-supervisor \
    PATH=/opt/ca-supervisor/bin:$PATH
COPY --from=build /dist/ /tmp/dist/
# pip stays in the venv: `supervisor deps` installs functions' requirements with it.
# Workers load their seccomp filter through libseccomp.so.2 (in the slim image
# as apt's dependency): the build fails if it cannot be loaded.
RUN python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir --disable-pip-version-check /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && python -c "import ctypes; ctypes.CDLL('libseccomp.so.2')"

WORKDIR /app
# Fails the build if the installed package cannot even read its bundled example.
RUN supervisor validate

# FC sends traffic to this port (FC_SERVER_PORT overrides ca_port).
ENV FC_SERVER_PORT=9000 \
    SUPERVISOR_RUN_DIR=/tmp/ca-supervisor
EXPOSE 9000 9464

ENTRYPOINT ["/opt/ca-supervisor/bin/supervisor", "run"]
