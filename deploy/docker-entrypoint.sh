#!/usr/bin/env bash
# Entrypoint of the loraswap images (Dockerfile, deploy/Dockerfile.cuda).
#
#   (no arguments), serve [flags], --flag ...   check the environment (every LORASWAP_*
#                                               value, through the server's Settings),
#                                               prepare the data folders, then exec
#                                               `loraswap serve ...`
#   healthcheck                                 exit 0 when GET /health answers 200
#   demo | adapters | aliases | tenants ...     exec `loraswap "$@"`
#   anything else                               exec it as given (e.g. bash)
#
# Configuration is the server's own environment (LORASWAP_*, see README "Configuration"),
# plus, for the image only:
#   LORASWAP_DEMO=1          serve the demo model and adapters (built on first start into
#                            $LORASWAP_HOME/demo; needs the package registry once)
#   LORASWAP_QUANTIZED=1     with LORASWAP_DEMO: the int8 base
#   LORASWAP_ADMIN_KEY_FILE  read the admin key from this file (e.g. a Docker secret)
# Without LORASWAP_MODEL, a model mounted at /models is served; without
# LORASWAP_ADAPTERS_DIR, the adapter folders mounted at /adapters (not with the demo).
set -euo pipefail

model_mount="${LORASWAP_MODEL_MOUNT:-/models}"
adapters_mount="${LORASWAP_ADAPTERS_MOUNT:-/adapters}"

settings_check='
import sys
from pydantic import ValidationError
from pydantic_settings import SettingsError
from server.settings import Settings
try:
    Settings()
except ValidationError as e:
    for err in e.errors():
        name = "LORASWAP_" + "__".join(str(p) for p in err["loc"]).upper()
        print(name + ": " + err["msg"])
    sys.exit(1)
except SettingsError as e:
    print(str(e) + " (lists are JSON, e.g. [\"/srv/adapters\"])")
    sys.exit(1)
'

die() {
  printf 'docker-entrypoint: error: %s\n' "$*" >&2
  exit 64
}

note() {
  printf 'docker-entrypoint: %s\n' "$*" >&2
}

# Booleans as pydantic reads them; prints true/false (unset: false), dies on anything else.
bool() {
  local name="$1"
  if [[ -z "${!name+x}" ]]; then
    echo false
    return
  fi
  local value="${!name}"
  case "${value,,}" in
    0 | false | f | no | n | off) echo false ;;
    1 | true | t | yes | y | on) echo true ;;
    *) die "$name=$value: expected true or false (1/0, yes/no, on/off)" ;;
  esac
}

has_arg() {
  local want="$1" arg
  shift
  for arg in "$@"; do
    if [[ "$arg" == "$want" || "$arg" == "$want="* ]]; then
      return 0
    fi
  done
  return 1
}

writable_dir() {
  local name="$1" dir="$2"
  [[ "$dir" == /* ]] || die "$name=$dir: must be an absolute path"
  mkdir -p -- "$dir" 2>/dev/null || die "$name: cannot create $dir (uid $(id -u)); mount a volume there that this user may write"
  [[ -w "$dir" ]] || die "$name: $dir is not writable by uid $(id -u); chown the volume to $(id -u) (or run with --user)"
}

healthcheck() {
  local host="${LORASWAP_HOST:-127.0.0.1}" port="${LORASWAP_PORT:-8000}"
  case "$host" in
    0.0.0.0 | "") host=127.0.0.1 ;;
    :: | "[::]") host="[::1]" ;;
    *:*) host="[$host]" ;;
  esac
  exec "${LORASWAP_PYTHON:-python3}" -c '
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:
    print(f"unhealthy: {e}", file=sys.stderr)
    sys.exit(1)
' "http://$host:$port/health"
}

serve() {
  if has_arg --help "$@"; then
    exec loraswap serve "$@"
  fi
  local -a flags=()
  local demo quantized unsafe
  demo=$(bool LORASWAP_DEMO)
  quantized=$(bool LORASWAP_QUANTIZED)
  unsafe=$(bool LORASWAP_UNSAFE_ALLOW_OPEN_NETWORK)
  bool LORASWAP_ENGINE__LORA_FIX >/dev/null
  bool LORASWAP_ENGINE__ENFORCE_EAGER >/dev/null
  has_arg --demo "$@" && demo=true
  has_arg --quantized "$@" && quantized=true
  has_arg --unsafe-allow-open-network "$@" && unsafe=true

  if [[ -n "${LORASWAP_PORT+x}" ]]; then
    if [[ ! "$LORASWAP_PORT" =~ ^[0-9]{1,5}$ ]] || ((10#$LORASWAP_PORT < 1 || 10#$LORASWAP_PORT > 65535)); then
      die "LORASWAP_PORT=$LORASWAP_PORT: expected a port number, 1 to 65535"
    fi
  fi
  [[ -z "${LORASWAP_HOST+x}" || -n "$LORASWAP_HOST" ]] || die "LORASWAP_HOST is set but empty"

  # The admin key, from a file (Docker/Kubernetes secret) or the environment; not both.
  if [[ -n "${LORASWAP_ADMIN_KEY_FILE:-}" ]]; then
    [[ -z "${LORASWAP_ADMIN_KEY:-}" ]] || die "set LORASWAP_ADMIN_KEY or LORASWAP_ADMIN_KEY_FILE, not both"
    [[ -f "$LORASWAP_ADMIN_KEY_FILE" && -r "$LORASWAP_ADMIN_KEY_FILE" ]] ||
      die "LORASWAP_ADMIN_KEY_FILE=$LORASWAP_ADMIN_KEY_FILE: not a readable file"
    LORASWAP_ADMIN_KEY=$(tr -d '\r\n' <"$LORASWAP_ADMIN_KEY_FILE")
    [[ -n "$LORASWAP_ADMIN_KEY" ]] || die "LORASWAP_ADMIN_KEY_FILE=$LORASWAP_ADMIN_KEY_FILE is empty"
    export LORASWAP_ADMIN_KEY
    unset LORASWAP_ADMIN_KEY_FILE
  fi

  # The model: the demo's, LORASWAP_MODEL, --model, or the folder mounted at /models.
  if [[ "$demo" == true ]]; then
    if [[ -n "${LORASWAP_MODEL:-}" ]] || has_arg --model "$@"; then
      die "LORASWAP_DEMO serves the demo model: unset LORASWAP_MODEL (or --model), or LORASWAP_DEMO"
    fi
    has_arg --demo "$@" || flags+=(--demo)
    if [[ "$quantized" == true ]] && ! has_arg --quantized "$@"; then
      flags+=(--quantized)
    fi
  else
    [[ "$quantized" == false ]] || die "LORASWAP_QUANTIZED selects the demo's int8 base: set LORASWAP_DEMO=1 too"
    if ! has_arg --model "$@"; then
      if [[ -z "${LORASWAP_MODEL:-}" ]]; then
        [[ -f "$model_mount/config.json" ]] ||
          die "no model: mount a model folder (config.json, *.safetensors, tokenizer) at $model_mount, set LORASWAP_MODEL to one, or set LORASWAP_DEMO=1 for the demo"
        export LORASWAP_MODEL="$model_mount"
      fi
      [[ -d "$LORASWAP_MODEL" ]] || die "LORASWAP_MODEL=$LORASWAP_MODEL: no such directory (is the volume mounted?)"
      [[ -f "$LORASWAP_MODEL/config.json" ]] ||
        die "LORASWAP_MODEL=$LORASWAP_MODEL: no config.json there; expected a model folder"
    fi
    if [[ -z "${LORASWAP_ADAPTERS_DIR:-}" ]] && ! has_arg --adapters-dir "$@" && [[ -d "$adapters_mount" ]]; then
      export LORASWAP_ADAPTERS_DIR="$adapters_mount"
    fi
  fi
  if [[ -n "${LORASWAP_ADAPTERS_DIR:-}" && ! -d "$LORASWAP_ADAPTERS_DIR" ]]; then
    die "LORASWAP_ADAPTERS_DIR=$LORASWAP_ADAPTERS_DIR: no such directory (is the volume mounted?)"
  fi

  # Every other LORASWAP_* value, through the server's own Settings: one line per problem
  # instead of a traceback at start-up.
  local problems
  if ! problems=$("${LORASWAP_PYTHON:-python3}" -c "$settings_check" 2>&1); then
    die "invalid settings: ${problems//$'\n'/; }"
  fi

  # Writable state: home (demo assets), the registry database, uploads and downloads.
  [[ -n "${LORASWAP_HOME:-}" ]] || die "LORASWAP_HOME is not set (the image sets /data)"
  writable_dir LORASWAP_HOME "$LORASWAP_HOME"
  local db="${LORASWAP_REGISTRY_DB:-$LORASWAP_HOME/registry.db}"
  writable_dir "LORASWAP_REGISTRY_DB's folder" "$(dirname -- "$db")"
  writable_dir LORASWAP_STORAGE_DIR "${LORASWAP_STORAGE_DIR:-$LORASWAP_HOME/registry}"

  # Beyond loopback the server needs API keys; a fresh registry has no tenants, so
  # without an admin key it would refuse to start: say so now, and how to fix it.
  local host="${LORASWAP_HOST:-127.0.0.1}"
  if [[ ! "$host" =~ ^(127\.|localhost$|::1$) && -z "${LORASWAP_ADMIN_KEY:-}" && "$unsafe" == false ]]; then
    if [[ ! -e "$db" ]]; then
      die "serving on $host with no API keys: set LORASWAP_ADMIN_KEY (or LORASWAP_ADMIN_KEY_FILE) and create tenants through the admin API, or LORASWAP_UNSAFE_ALLOW_OPEN_NETWORK=true to let anyone in"
    fi
    note "no admin key: the server starts only if the registry ($db) has tenants"
  fi

  local what="${LORASWAP_MODEL:-the model given by flag}" adapters="${LORASWAP_ADAPTERS_DIR:-none}"
  if [[ "$demo" == true ]]; then
    what="the demo model"
    adapters="${LORASWAP_ADAPTERS_DIR:-the demo adapters}"
  fi
  note "serving $what (adapters: $adapters) on $host:${LORASWAP_PORT:-8000}, state in $LORASWAP_HOME"
  exec loraswap serve "${flags[@]}" "$@"
}

case "${1:-serve}" in
  serve)
    shift $(($# > 0 ? 1 : 0))
    serve "$@"
    ;;
  -*) serve "$@" ;;
  healthcheck) healthcheck ;;
  demo | adapters | aliases | tenants) exec loraswap "$@" ;;
  *) exec "$@" ;;
esac
