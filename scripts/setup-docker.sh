# Docker for Ferry's `docker` adapter and its end-to-end tests. Sourced by scripts/setup
# (after its helpers), or run on its own as root: `bash scripts/setup-docker.sh`.
# Idempotent; never starts, stops or restarts a daemon.
#  - Debian's docker.io (20.10: `docker checkpoint` is experimental) and containerd; their
#    packaged services are not started (the tests start one daemon per site themselves,
#    with a configuration of their own: tests/src/docker.rs)
#  - for the host's own daemon, should a site use it: experimental mode in
#    /etc/docker/daemon.json, and CRIU options in /etc/ferry/docker-criu.conf (tcp-close:
#    open connections are closed, their clients reconnect through the ingress) named by
#    CRIU_CONFIG_FILE in the daemon's environment. Per daemon, never /etc/criu/runc.conf,
#    which every runc on the host would read (the runc and podman adapters' too).
# runc finds `criu` in its PATH: /usr/local/sbin, where scripts/setup installs CRIU 4.2,
# comes first in systemd's default PATH and in the PATH the tests give their daemons.

if ! declare -F log >/dev/null; then
  set -euo pipefail
  log() { printf '\033[1m[setup-docker]\033[0m %s\n' "$*"; }
  [ "$(id -u)" = 0 ] || { echo "setup-docker.sh must run as root" >&2; exit 1; }
fi

if ! declare -F install_pkgs >/dev/null; then
  install_pkgs() {
    local p missing=()
    for p in "$@"; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    log "installing: ${missing[*]}"
    # Packaged daemons must not start on install.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
  }
fi

FERRY_DOCKER_CRIU_CONF=/etc/ferry/docker-criu.conf

# An engine already installed (Docker's own docker-ce packages conflict with docker.io) is
# used as it is.
if command -v dockerd >/dev/null 2>&1 && command -v containerd >/dev/null 2>&1; then
  install_pkgs runc iptables tar python3
else
  install_pkgs docker.io containerd runc iptables tar python3
fi

# The host daemon's experimental mode (checkpoints), other settings kept.
mkdir -p /etc/docker
python3 - /etc/docker/daemon.json <<'EOF'
import json, os, sys
path = sys.argv[1]
try:
    with open(path) as f:
        cfg = json.load(f) if os.path.getsize(path) else {}
except FileNotFoundError:
    cfg = {}
except ValueError as e:
    sys.exit(f"{path} is not JSON ({e}); set \"experimental\": true in it by hand")
if cfg.get("experimental") is not True:
    cfg["experimental"] = True
    with open(path + ".ferry-tmp", "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    os.replace(path + ".ferry-tmp", path)
    print(f"[setup-docker] experimental mode set in {path} (restart the host's dockerd to apply)")
EOF

mkdir -p "$(dirname "$FERRY_DOCKER_CRIU_CONF")"
if [ "$(cat "$FERRY_DOCKER_CRIU_CONF" 2>/dev/null)" != "$(printf 'tcp-close\nskip-in-flight')" ]; then
  printf 'tcp-close\nskip-in-flight\n' > "$FERRY_DOCKER_CRIU_CONF"
  log "CRIU options for Docker's checkpoints in $FERRY_DOCKER_CRIU_CONF"
fi
if [ -d /run/systemd/system ]; then
  dropin=/etc/systemd/system/docker.service.d/ferry-criu.conf
  if [ ! -f "$dropin" ]; then
    mkdir -p "$(dirname "$dropin")"
    printf '[Service]\nEnvironment=CRIU_CONFIG_FILE=%s\n' "$FERRY_DOCKER_CRIU_CONF" > "$dropin"
    systemctl daemon-reload
    log "docker.service gets CRIU_CONFIG_FILE=$FERRY_DOCKER_CRIU_CONF (restart it to apply)"
  fi
elif ! grep -q '^export CRIU_CONFIG_FILE=' /etc/default/docker 2>/dev/null; then
  # The SysV init script sources this file.
  printf '# Ferry: CRIU options for the checkpoints Docker takes\nexport CRIU_CONFIG_FILE=%s\n' \
    "$FERRY_DOCKER_CRIU_CONF" >> /etc/default/docker
  log "/etc/default/docker exports CRIU_CONFIG_FILE=$FERRY_DOCKER_CRIU_CONF"
fi
log "$(dockerd --version 2>/dev/null || echo 'dockerd: not found'), $(containerd --version 2>/dev/null | awk '{print "containerd", $3}'), $(runc --version 2>/dev/null | head -1)"
