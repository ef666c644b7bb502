#!/bin/sh
# Install or upgrade wardsync on a Debian or Ubuntu server: the steps of README.md,
# "Installing on a ward's Linux server". Run as root; it installs the source tree it is part of:
#
#   sh deploy/install.sh --unit 26743 --agency-code 000.00.17.H29 [--listen HOST:PORT] [--no-start]
#
# Safe to run again. It never overwrites /etc/wardsync/wardsync.toml or touches the data in
# /var/lib/wardsync, and it refuses to upgrade a node that is running (stop it first). It starts the
# service only when this run installed the unit for the first time (and not with --no-start).
set -eu

PREFIX=/opt/wardsync
VENV=$PREFIX/.venv
CONF_DIR=/etc/wardsync
CONF=$CONF_DIR/wardsync.toml
DATA=/var/lib/wardsync
UNIT_FILE=/etc/systemd/system/wardsync.service
SERVICE_USER=wardsync

SRC=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
UNIT=
AGENCY=
LISTEN=127.0.0.1:8080
START=yes

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,10s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
    case $1 in
        --unit) [ $# -ge 2 ] || die "--unit needs a value"; UNIT=$2; shift 2 ;;
        --unit=*) UNIT=${1#*=}; shift ;;
        --agency-code) [ $# -ge 2 ] || die "--agency-code needs a value"; AGENCY=$2; shift 2 ;;
        --agency-code=*) AGENCY=${1#*=}; shift ;;
        --listen) [ $# -ge 2 ] || die "--listen needs a value"; LISTEN=$2; shift 2 ;;
        --listen=*) LISTEN=${1#*=}; shift ;;
        --no-start) START=no; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (for example with sudo)"
if [ ! -f "$SRC/pyproject.toml" ] || [ ! -f "$SRC/deploy/wardsync.service" ]; then
    die "$SRC does not look like a wardsync source directory"
fi
if [ ! -f "$CONF" ] && { [ -z "$UNIT" ] || [ -z "$AGENCY" ]; }; then
    die "--unit and --agency-code are needed to write $CONF"
fi

SYSTEMD=no
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    SYSTEMD=yes
    if systemctl is-active --quiet wardsync.service; then
        die "wardsync is running; stop it first (systemctl stop wardsync), then run this again"
    fi
fi

# 1. Python 3.11 or newer with venv support.
python_ok() {
    command -v "$PY" >/dev/null 2>&1 &&
        "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || return 1
    probe=$(mktemp -d)
    if "$PY" -m venv "$probe/venv" >/dev/null 2>&1; then rm -rf "$probe"; return 0; fi
    rm -rf "$probe"
    return 1
}
if [ ! -x "$VENV/bin/python" ] && ! python_ok; then
    say "installing python3 and python3-venv"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-venv
    python_ok || die "$PY is not Python 3.11 or newer with venv support; set PYTHON=/path/to/python3.11"
fi

# 2. The system user the service runs as.
if ! getent group "$SERVICE_USER" >/dev/null; then
    groupadd --system "$SERVICE_USER"
    say "created group $SERVICE_USER"
fi
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --gid "$SERVICE_USER" --home-dir "$DATA" --no-create-home \
        --shell /usr/sbin/nologin --comment "wardsync node" "$SERVICE_USER"
    say "created user $SERVICE_USER"
fi

# 3. The program: a virtual environment in /opt/wardsync with this release installed into it.
install -d -m 0755 -o root -g root "$PREFIX"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    say "created $VENV"
fi
say "installing $(sed -n 's/^version = "\(.*\)"/wardsync \1/p' "$SRC/pyproject.toml") from $SRC"
(cd "$SRC" && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check .)

# 4. Configuration, readable by the service, writable only by root.
install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF_DIR"
if [ -f "$CONF" ]; then
    [ -z "$UNIT$AGENCY" ] || say "kept the existing $CONF (--unit and --agency-code not applied)"
else
    "$VENV/bin/wardsync" init --unit "$UNIT" --agency-code "$AGENCY" --listen "$LISTEN" \
        --data-dir "$DATA" --out "$CONF"
fi
chown root:"$SERVICE_USER" "$CONF"
chmod 0640 "$CONF"
# The keyring init writes beside the configuration (encryption at rest): root's, read by the service's group.
KEY_FILE=$CONF_DIR/wardsync.key
if [ -f "$KEY_FILE" ]; then
    chown root:"$SERVICE_USER" "$KEY_FILE"
    chmod 0640 "$KEY_FILE"
fi

# 5. The data directory (systemd's StateDirectory= would create it too, with the same owner and mode).
if [ ! -d "$DATA" ]; then
    install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$DATA"
    say "created $DATA"
fi

# 6. The systemd unit.
NEW_UNIT=no
if [ ! -f "$UNIT_FILE" ]; then
    NEW_UNIT=yes
    install -m 0644 "$SRC/deploy/wardsync.service" "$UNIT_FILE"
    say "installed $UNIT_FILE"
elif ! cmp -s "$SRC/deploy/wardsync.service" "$UNIT_FILE"; then
    install -m 0644 "$SRC/deploy/wardsync.service" "$UNIT_FILE"
    say "updated $UNIT_FILE"
fi

if [ "$SYSTEMD" = no ]; then
    say "systemd is not running here: nothing was started"
    exit 0
fi
systemctl daemon-reload
if [ "$NEW_UNIT" = yes ] && [ "$START" = yes ]; then
    systemctl enable --now wardsync.service
    say "started: systemctl status wardsync; logs: journalctl -u wardsync -f"
else
    say "done; start the node with: systemctl enable --now wardsync"
fi
