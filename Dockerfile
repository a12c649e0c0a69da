# Installs fleetsim the way .ci/run does: a virtualenv with the checkout and
# its test extras. The embedded PostgreSQL refuses to run as root, so the
# image runs as an ordinary user, who owns every folder fleetsim writes in:
# the checkout (the editable install writes fleetsim.egg-info there) and the
# run directory of `docker compose up fleet` (FLEETSIM_RUN_DIR).
FROM python:3.11-slim
RUN useradd --create-home fleetsim \
    && install -d -o fleetsim -g fleetsim /home/fleetsim/app /var/lib/fleetsim
WORKDIR /home/fleetsim/app
COPY --chown=fleetsim:fleetsim . .
USER fleetsim
RUN python -m venv /home/fleetsim/venv \
    && /home/fleetsim/venv/bin/pip install --no-cache-dir -e '.[test]'
ENV PATH=/home/fleetsim/venv/bin:$PATH
CMD ["fleetsim", "--help"]
