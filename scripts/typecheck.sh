#!/usr/bin/env bash
# mypy over the packages, the tests and the benchmarks (`make lint` and pre-commit run it).
#
# Import names differ from some folder names (operator/ is recsys_operator, contracts/ is
# recsys_contracts), so mypy runs in build/typecheck, where links carry the import names.
# The tests run in separate passes because pytest puts some test folders themselves on
# sys.path (they have no __init__.py, and their modules import each other by bare name,
# e.g. `from gateway_testing import ...`), and two of them hold a `conftest` module.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MYPY="${MYPY:-$ROOT/.venv/bin/mypy}"
[ -x "$MYPY" ] || MYPY="$(command -v mypy)"  # e.g. a shared venv on PATH
MYPY="$(realpath "$MYPY")"  # it runs from build/typecheck
TESTS_ON_THEIR_OWN=(gateway_http stream)  # folders pytest puts on sys.path

work="$ROOT/build/typecheck"
rm -rf "$work/recsys_operator" "$work/recsys_contracts"
mkdir -p "$work"
ln -s ../../operator "$work/recsys_operator"
ln -s ../../contracts "$work/recsys_contracts"
cd "$work"

mypy() {  # mypy PATHS_FOR_MYPYPATH -- ARGS...
    local path="$1"
    shift
    MYPYPATH="$path" "$MYPY" --config-file "$ROOT/pyproject.toml" "$@"
}

failed=0  # every pass runs, so one run shows every error
echo "mypy: packages"
mypy "$ROOT" -p recsys_contracts -p recsys_operator -p stream_jobs -p model_handlers -p gateway \
    || failed=1
echo "mypy: benchmarks/"
mypy "$ROOT:$ROOT/tests" "$ROOT/benchmarks" || failed=1
echo "mypy: tests/"
exclude="tests/($(IFS='|'; echo "${TESTS_ON_THEIR_OWN[*]}"))/"
mypy "$ROOT:$ROOT/tests" --exclude "$exclude" "$ROOT/tests" || failed=1
for folder in "${TESTS_ON_THEIR_OWN[@]}"; do
    echo "mypy: tests/$folder/"
    mypy "$ROOT:$ROOT/tests:$ROOT/tests/$folder" "$ROOT/tests/$folder" || failed=1
done
exit "$failed"
