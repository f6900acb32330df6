"""OpenVPP service package.

gRPC core reads its settings from the environment once, when it is first initialized, so they
are set here: every entry point (the ``openvpp`` command, the tests, the benchmarks) imports
this package before it creates a channel or a server. An operator's own values win.
"""

import os

# Core's INFO lines (e.g. on fork) are not for operators; errors still come through.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# Our only forks are fork+exec of PostgreSQL's tools (the embedded database's pg_ctl runs
# as another user, so subprocess cannot use vfork). gRPC's fork handlers are for children
# that go on using gRPC; for a child that execs at once they only add risk, and with a call
# in flight they log "skipping fork() handlers" on every fork (seen at shutdown).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
