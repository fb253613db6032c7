# Contributor shortcuts. Nothing here is required: ./script/up and ./script/test are the
# two commands, and they need nothing pre-installed.

default:
    @just --list

# install into ./.venv (idempotent)
bootstrap:
    script/bootstrap

# the whole stack with demo traffic
up *ARGS:
    script/up {{ARGS}}

# the full test suite
test *ARGS:
    script/test {{ARGS}}

# create or update streams and consumers on $NATS_URL
setup:
    script/bootstrap && .venv/bin/callplane nats setup

# refresh the event catalog in README.md and the stream JSON in deploy/
docs:
    script/bootstrap && .venv/bin/callplane schemas catalog --readme README.md && .venv/bin/python deploy/streams/generate.py

# benchmarks (not part of the test suite)
bench:
    script/bootstrap && .venv/bin/python bench/admission.py
