#!/usr/bin/env bash
# Nightly: the spawn and nightly suites under every start method this platform
# has (fork, spawn, forkserver), then the W4 and W7 benchmarks as a report.
#
#   bash ci/nightly_spawn.sh            # all start methods available here
#   START_METHODS="spawn" bash ci/nightly_spawn.sh
#
# The tests read CE_TEST_START_METHODS (tests/_crash_tasks.py:start_methods);
# CE_NIGHTLY_EXECUTORS shortens the 1,000-executor loop (FAULTS.md #23).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
WORKERS=${PYTEST_WORKERS:-2}
if [ -z "${START_METHODS:-}" ]; then
    START_METHODS=$("$PYTHON" -c "import multiprocessing as m; print(' '.join(x for x in ('fork', 'spawn', 'forkserver') if x in m.get_all_start_methods()))")
fi

status=0
for method in $START_METHODS; do
    echo "== spawn + nightly suites, start method: $method"
    CE_TEST_START_METHODS=$method "$PYTHON" -m pytest tests/spawn tests/nightly \
        -m "spawn or nightly" -n "$WORKERS" -p no:cacheprovider -q || status=1
done

echo "== the behavioural suite on processes (fork and spawn)"
"$PYTHON" -m pytest tests/integration -k "processes" -n "$WORKERS" -p no:cacheprovider -q || status=1

echo "== benchmarks (report only: shared machines are noisy)"
"$PYTHON" ci/bench/dispatch.py --rounds 5 || echo "W4 benchmark could not run"
"$PYTHON" ci/bench/warm.py || echo "W7 benchmark could not run"
"$PYTHON" ci/bench/quiet.py || echo "quiet-after-map benchmark could not run"

exit "$status"
