# Shared by scripts/run, scripts/test and scripts/test-minimums: make a
# virtual environment ($venv, .venv by default) with the project installed.
# Sourced, not executed.  pip_options, if set, are added to the install
# (scripts/test-minimums pins versions with them).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${venv:-"$here/.venv"}
py=${PYTHON:-python3}
extra=${extra:-}
pip_options=${pip_options:-}
if [ ! -x "$venv/bin/python" ]; then
    if ! "$py" -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "python3 -m venv failed; installing python3-venv" >&2
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$py" -m venv "$venv"
        else
            echo "python3 -m venv failed: install Debian's python3-venv package" >&2
            exit 2
        fi
    fi
fi
stamp="$venv/.installed$extra"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    # shellcheck disable=SC2086 # pip_options is a list of words
    "$venv/bin/python" -m pip install -q $pip_options -e "$here$extra"
    touch "$stamp"
fi
