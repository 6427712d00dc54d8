#!/usr/bin/env bash
# Trains diffusion_jax on a Cloud TPU VM, from a single-host v3-8 up to multi-host pod slices, from
# a laptop with the Google Cloud SDK. Walk-through: docs/cloud_tpu.md.
#
# Usage: launch/tpu.sh [--tpu NAME] [--zone ZONE] [--project P]
#                      [--internal-ip | --tunnel-through-iap] [--dry-run] COMMAND [ARGS...]
#
# Global options (before COMMAND), or the environment variable named on the right:
#   --tpu NAME            TPU_NAME                  the TPU VM (with --queued also the queued
#                                                   resource); required
#   --zone ZONE           ZONE                      its zone, e.g. us-central1-a; required
#   --project P           PROJECT                   the project (default: gcloud's core/project)
#   --internal-ip         TPU_INTERNAL_IP=1         ssh and scp to the workers' internal IPs (a
#                                                   TPU created with `-- --internal-ips`, from a
#                                                   machine in its network or VPN)
#   --tunnel-through-iap  TPU_TUNNEL_THROUGH_IAP=1  ssh and scp through Identity-Aware Proxy (no
#                                                   external IP needed; gcloud's alpha commands)
#   --dry-run                                       print every command, one per line,
#                                                   shell-quoted, and run nothing
#   -h, --help                                      this text
#
# Commands, in the order of a run:
#   plan TPU_TYPE CONFIG [FLAGS...]
#       Before any TPU is created, on this machine (Linux x86-64, no TPU needed): XLA:TPU
#       compiles every program of the run (python -m benchmarks.tpu_compile) for TPU_TYPE (v3-8,
#       v4-32, v5litepod-8, v6e-8, tpu7x-8, ...) and prints per device what it needs against
#       the chip's HBM, whether it fits (if not, the first setting that does), XLA's step time
#       and MFU. Sets up .venv with the TPU runtime first (WITH_TPU=1 launch/setup.sh). FLAGS:
#       --config.x=y overrides, as for train. Needs no --tpu or --zone.
#   create --accelerator-type TYPE [--version RUNTIME] [--spot] [--queued] [-- GCLOUD_FLAGS...]
#       A TPU VM of TYPE (v3-8, v4-32, v5litepod-16, v6e-8, ...). --queued: a queued resource
#       (waits for capacity; the node gets the same name). --spot: a spot VM. Default RUNTIME:
#       tpu-ubuntu2204-base (v2, v3, v4), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
#       v2-alpha-tpuv6e (v6e). TPU7x and later: the Cloud TPU API (gcloud compute tpus) does not
#       support them; use GKE (docs/cloud_tpu.md). GCLOUD_FLAGS go to gcloud as they are
#       (--service-account=...).
#   push [--allow-dirty | --commit COMMIT]
#       The current commit (git archive HEAD) to ~/diffusion_jax on every worker, replacing the
#       code there but keeping .venv and logs; writes the commit id to ~/diffusion_jax/COMMIT.
#       Refuses uncommitted changes to tracked files unless --allow-dirty (even then only the
#       committed code is pushed). --commit: COMMIT instead of HEAD.
#   setup [--commit COMMIT]
#       On every worker, once (again after requirements.txt changes): uv (pip --user), Python
#       PYTHON_VERSION (3.13; uv), ~/diffusion_jax/.venv with every pin of the lock file of that
#       Python (requirements.txt; libtpu included, from the package index) and the package. Run
#       push first: it refuses a lock file that is not the one of COMMIT (HEAD).
#   train CONFIG WORKDIR [FLAGS...]
#       On every worker, detached (it outlives the ssh session): python -m diffusion_jax.main
#       --config=CONFIG --workdir=WORKDIR --distributed
#       --jax_compilation_cache_dir=WORKDIR/jax_cache FLAGS... with JAX_PLATFORMS=tpu. FLAGS are
#       passed as they are (--config.model.ch_mult='(1,1,2,2,4,4)', --nodistributed, ...).
#       WORKDIR must be gs://BUCKET/... on a multi-host slice. The log of each host is
#       ~/diffusion_jax/logs/train_<hostname>.log there, copied to WORKDIR/logs/ every
#       LOG_SYNC_SECONDS (60) seconds and at exit (a copy that fails is reported once in the
#       log, with the fix; status shows it). It fails, with the end of the log, if the run
#       ends with an error within START_CHECK_SECONDS (10). The same command again resumes
#       the run.
#   logs [--worker N|all] [--follow] [--lines N]
#       The last N (100) lines of a worker's (0) training log; --follow keeps following it.
#   status
#       The TPU (gcloud describe), then on every worker: the pushed commit, the training
#       processes, failed log copies and the last lines of the log.
#   stop [--grace SECONDS]
#       On every worker: SIGTERM to the run (it saves a checkpoint and exits, as on a
#       preemption), SIGKILL after SECONDS (120), then any process still holding the TPU,
#       and the libtpu lockfile (/tmp/libtpu_lockfile).
#   delete [--queued]
#       Deletes the TPU VM (--queued: the queued resource and its node).
#   watch [--poll SECONDS] [--max-restarts N] [--log FILE]
#         create CREATE_ARGS... train CONFIG WORKDIR [FLAGS...]
#       Keeps a spot or queued run going without a person, from a laptop or a small VM (in
#       tmux or nohup). Every SECONDS (WATCH_POLL_SECONDS, 60) it reads the TPU's state. A TPU
#       that is PREEMPTED, TERMINATED, SUSPENDED, FAILED or gone is deleted and made again
#       (create CREATE_ARGS...), then push and setup of the commit checked out when watch
#       started, and train CONFIG WORKDIR FLAGS..., which resumes from WORKDIR's latest
#       checkpoint (gs://). A READY TPU without the run gets it the same way (if it had it,
#       after WATCH_IDLE_SECONDS, 120: a preempted TPU may say READY for a while). It ends
#       when the run on worker 0 has ended with "Done: step N" and exit status 0 (0), when
#       the run fails (1), or when the TPU needs an (N+1)th restart (1; N:
#       WATCH_MAX_RESTARTS, 10). Each event is one line, with the time, the state seen and
#       the restart count, on stderr and in FILE (WATCH_LOG, default
#       ~/.local/state/diffusion_jax/watch_<TPU>.log). To end the run by hand, end watch
#       first (Ctrl-C), then stop. The first word train ends CREATE_ARGS (gcloud flags:
#       --flag=value).
#
# Example (v3-8):
#   export TPU_NAME=ddpm ZONE=europe-west4-a
#   launch/tpu.sh create --accelerator-type v3-8 --spot
#   launch/tpu.sh push && launch/tpu.sh setup
#   launch/tpu.sh train configs/cifar10.py gs://BUCKET/cifar10 \
#       --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
#   launch/tpu.sh logs --follow
#   launch/tpu.sh stop && launch/tpu.sh delete
# or all of it, brought back after each preemption:
#   launch/tpu.sh watch create --accelerator-type v3-8 --spot train configs/cifar10.py \
#       gs://BUCKET/cifar10 --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=launch/tpu.sh

tpu=${TPU_NAME:-}
zone=${ZONE:-}
python_version=${PYTHON_VERSION:-3.13}  # the main line of requirements.txt
project=${PROJECT:-}
internal_ip=${TPU_INTERNAL_IP:-0}
iap=${TPU_TUNNEL_THROUGH_IAP:-0}
dry_run=0
scope=()   # --zone=... [--project=...], for every gcloud command
remote=()  # gcloud [alpha] compute tpus tpu-vm, for ssh and scp (alpha: through IAP)
reach=()   # --internal-ip or --tunnel-through-iap, for ssh and scp

# --- remote scripts ---------------------------------------------------------------------------
# Each runs in bash on the workers (ssh --command), after `set -euo pipefail`, the assignments
# that remote_script() puts in front (values quoted with printf %q) and WORKER_BODY.

# Reads a here-document into the variable $1 (read -d '' stops at the end: status 1).
heredoc() { IFS= read -r -d '' "$1" || true; }

# What every remote script knows: the code, this host's training log, the run's process group.
heredoc WORKER_BODY <<'EOF'
dir=$HOME/diffusion_jax
host=$(hostname)
# shellcheck disable=SC2034  # not every script reads the log
log=$dir/logs/train_$host.log
pidfile=$dir/logs/train.pid
# Whether the run that train started is alive (its process group, named in $pidfile).
run_alive() { [[ -s $pidfile ]] && kill -0 -- "-$(cat "$pidfile")" 2>/dev/null; }
# The latest run's lines of the log: from the header that train writes on.
latest_run() {
  awk '/^=== .*, commit .*: python /{n = 0} {line[n++] = $0}
    END {for (i = 0; i < n; i++) print line[i]}' "$log"
}
EOF

# Sets: commit.
heredoc PUSH_BODY <<'EOF'
archive=$HOME/diffusion_jax.tar.gz
if run_alive; then
  echo "$host: a run is in progress: launch/tpu.sh stop first" >&2
  exit 1
fi
mkdir -p "$dir"
find "$dir" -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +
tar -xzf "$archive" -C "$dir"
rm -f "$archive"
printf '%s\n' "$commit" > "$dir/COMMIT"
echo "$host: $dir is commit $commit"
EOF

# Sets: commit, lock (the lock file of python_version), lock_sum (its sha1 at commit),
# python_version.
heredoc SETUP_BODY <<'EOF'
cd "$dir" 2>/dev/null || { echo "$host: no $dir: run launch/tpu.sh push first" >&2; exit 1; }
if [[ ! -f $lock ]] || [[ $(sha1sum < "$lock" | cut -c1-40) != "$lock_sum" ]]; then
  echo "$host: $dir/$lock is not the one of commit $commit: run launch/tpu.sh push first" >&2
  exit 1
fi
# The image's python3 may be 3.10: it only installs uv, which brings Python $python_version.
export PATH=$HOME/.local/bin:$PATH
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet --upgrade uv
uv python install "$python_version"
if ! .venv/bin/python -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$python_version')" 2>/dev/null; then
  rm -rf .venv
  uv venv --python "$python_version" .venv
fi
uv pip install --python .venv/bin/python --quiet -r "$lock"
uv pip install --python .venv/bin/python --quiet --no-deps -e .
.venv/bin/python -c 'import sys; from importlib.metadata import version as v
print("Python", sys.version.split()[0], "jax", v("jax"), "libtpu", v("libtpu"))' \
  | sed "s/^/$host: ready: /"
EOF

# Sets: workdir, args (the arguments of python), log_sync_seconds, start_check_seconds.
heredoc TRAIN_BODY <<'EOF'
# Runs in its own session (setsid): the trainer with its output appended to $log, the log copied
# to $dest every $interval seconds and at the end. SIGTERM (stop, preemption) goes to the
# trainer, which saves a checkpoint and exits.
runner() {
  local pidfile=$1 log=$2 dest=$3 interval=$4 py rc last
  shift 4
  echo "$$" > "$pidfile"
  "$@" >> "$log" 2>&1 < /dev/null &
  py=$!
  trap 'kill -TERM "$py" 2>/dev/null || true' TERM INT
  last=$SECONDS
  while kill -0 "$py" 2>/dev/null; do
    sleep 1
    if ((SECONDS - last >= interval)); then
      copy_log "$log" "$dest" || true
      last=$SECONDS
    fi
  done
  # The trainer has ended: a signal now has nothing to forward, and a trapped one would cut the
  # wait short with its own status (143) instead of the trainer's.
  trap '' TERM INT
  wait "$py" && rc=0 || rc=$?
  echo "=== $(date -u +%FT%TZ) exit status $rc" >> "$log"
  copy_log "$log" "$dest" || true
  rm -f "$pidfile"
  return "$rc"
}
# Copies the log $1 to $2. The first failure (copy_failed) is reported in the log itself, with
# gcloud's error and the fix; status shows it.
copy_log() {
  local error bucket account
  case $2 in
    gs://*) error=$(gcloud storage cp --quiet "$1" "$2" 2>&1 > /dev/null) && return 0 ;;
    *) error=$({ mkdir -p "$(dirname "$2")" && cp "$1" "$2"; } 2>&1) && return 0 ;;
  esac
  ((copy_failed)) && return 1
  copy_failed=1
  {
    echo "=== log copy: FAILED, this log cannot be copied to $2 (reported once):"
    echo "=== log copy:   ${error//$'\n'/$'\n'=== log copy:   }"
    if [[ $2 == gs://* ]]; then
      bucket=${2#gs://}
      account=$(gcloud config get-value account 2>/dev/null) || true
      echo "=== log copy: fix: let the VM's service account write the bucket (docs/cloud_tpu.md," \
        "section 3):"
      echo "=== log copy:   gcloud storage buckets add-iam-policy-binding gs://${bucket%%/*}" \
        "--member=serviceAccount:${account:-SERVICE_ACCOUNT} --role=roles/storage.objectAdmin"
    fi
  } >> "$1"
  return 1
}
# The exit status that the runner wrote after line $start of the log (empty while it runs).
exit_status() { sed -n "$((start + 1)),\$ s/^=== .* exit status \([0-9]*\)\$/\1/p" "$log"; }

if [[ ! -x $dir/.venv/bin/python ]]; then
  echo "$host: no $dir/.venv: run launch/tpu.sh push, then launch/tpu.sh setup" >&2
  exit 1
fi
if run_alive; then
  echo "$host: a run is in progress (process group $(cat "$pidfile")): launch/tpu.sh stop first" >&2
  exit 1
fi
cd "$dir"
mkdir -p logs
{
  printf '=== %s %s, commit %s:' "$(date -u +%FT%TZ)" "$host" "$(cat COMMIT 2>/dev/null || echo '?')"
  printf ' %q' python "${args[@]}"
  echo
} >> "$log"
start=$(wc -l < "$log")
JAX_PLATFORMS=tpu TF_CPP_MIN_LOG_LEVEL=2 setsid nohup bash -c \
  "$(declare -f runner copy_log)"'; copy_failed=0; runner "$@"' runner \
  "$pidfile" "$log" "${workdir%/}/logs/train_$host.log" "$log_sync_seconds" \
  "$dir/.venv/bin/python" "${args[@]}" > /dev/null 2>&1 < /dev/null &
# A run that ends within start_check_seconds (a bad flag, a busy TPU) fails this command.
for ((i = 0; i < 5 * start_check_seconds; i++)); do
  [[ -z $(exit_status) ]] || break
  sleep 0.2
done
if [[ -z $(exit_status) ]] && run_alive; then
  echo "$host: training in the background, log $log"
  exit 0
fi
status=$(exit_status)  # read after run_alive: the run may have ended in between
if [[ $status == 0 ]]; then
  echo "$host: the run ended at once, with exit status 0 (complete already?); log $log"
else
  echo "$host: the run ended at once, with exit status ${status:-unknown}; the end of $log:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
EOF

# Sets: lines, follow, prefix.
heredoc LOGS_BODY <<'EOF'
if [[ ! -f $log ]]; then
  echo "$host: no training log yet ($log)" >&2
  exit 1
fi
if ((prefix)); then
  tail -n "$lines" ${follow:+"$follow"} "$log" | sed -u "s/^/$host: /"
else
  tail -n "$lines" ${follow:+"$follow"} "$log"
fi
EOF

heredoc STATUS_BODY <<'EOF'
{
  echo "code: commit $(cat "$dir/COMMIT" 2>/dev/null || echo 'none (launch/tpu.sh push)')"
  # The brackets keep this shell, whose command line holds the pattern, out of the match.
  if pgrep -af '[d]iffusion_jax[.]main'; then
    echo 'training: running'
  else
    echo 'training: not running'
  fi
  if [[ -f $log ]]; then
    latest_run | grep '^=== log copy: ' || true  # copies to WORKDIR/logs/ that failed
    echo "last lines of $log:"
    tail -n 5 "$log"
  fi
} 2>&1 | sed "s/^/$host: /"
EOF

# For watch: the state of the run here, as the last line `run: STATE`. running; done (ended with
# exit status 0 after the trainer's "Done: step N" or "The run in ... is complete", which is
# printed first); stopped (ended otherwise with status 0, e.g. after a SIGTERM, or killed);
# failed (another status; the end of the log is printed first); none (no run here yet).
heredoc RUN_STATE_BODY <<'EOF'
if run_alive; then
  state='running'
elif [[ ! -f $log ]]; then
  state='none'
else
  run=$(latest_run)
  status=$(sed -n 's/^=== .* exit status \([0-9]*\)$/\1/p' <<< "$run")
  if [[ $status == 0 ]] && grep -E '  (Done: step [0-9]+ |The run in .* is complete)' <<< "$run"; then
    state='done'
  elif [[ -z $status || $status == 0 ]]; then
    state='stopped'
  else
    tail -n 20 <<< "$run"
    state='failed'
  fi
fi
echo "run: $state"
EOF

# Sets: grace.
heredoc STOP_BODY <<'EOF'
if run_alive; then
  group=$(cat "$pidfile")
  echo "$host: SIGTERM to the run (process group $group): it saves a checkpoint and exits"
  kill -TERM -- "-$group" 2>/dev/null || true
  for ((i = 0; i < grace; i++)); do
    kill -0 -- "-$group" 2>/dev/null || break  # the whole group: the runner outlives the pidfile
    sleep 1
  done
  if kill -0 -- "-$group" 2>/dev/null; then
    echo "$host: still running after ${grace}s: SIGKILL"
    kill -KILL -- "-$group" 2>/dev/null || true
  fi
fi
rm -f "$pidfile"
read -ra left <<< "$(pgrep -f '[d]iffusion_jax[.]main' | tr '\n' ' ' || true)"
if ((${#left[@]})); then
  echo "$host: SIGKILL to trainers started otherwise: ${left[*]}"
  kill -KILL "${left[@]}" 2>/dev/null || true
fi
# The TPU chips' device files (/dev/accel*, /dev/vfio/N), as the pushed code lists them; none
# without it.
read -ra chips <<< "$(python3 "$dir/diffusion_jax/accelerator.py" --tpu-chips 2>/dev/null || true)"
if ((${#chips[@]})); then
  read -ra holders <<< "$({ sudo lsof -t "${chips[@]}" 2>/dev/null \
    || sudo fuser "${chips[@]}" 2>/dev/null; } | tr -s ' \n' ' ' || true)"
  if ((${#holders[@]})); then
    echo "$host: SIGKILL to processes holding the TPU: ${holders[*]}"
    sudo kill -KILL "${holders[@]}" 2>/dev/null || true
  fi
fi
sudo rm -f /tmp/libtpu_lockfile
echo "$host: stopped, TPU free"
EOF

# --- helpers ----------------------------------------------------------------------------------

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

# A mistake in the command line: one line, exit 2.
usage_error() {
  echo "$PROG: error: $*" >&2
  exit 2
}

fail() {
  echo "$PROG: error: $*" >&2
  exit 1
}

note() { echo "$PROG: $*" >&2; }

# The arguments as one line of shell words that bash reads back as the same arguments.
quote() {
  local arg q out=''
  for arg in "$@"; do
    printf -v q '%q' "$arg"
    out+="${out:+ }$q"
  done
  printf '%s\n' "$out"
}

# Runs a command, or with --dry-run prints it. $1: how to show it when it runs (empty: as it is).
run() {
  local shown=$1
  shift
  if ((dry_run)); then
    quote "$@"
  else
    echo "+ ${shown:-$(quote "$@")}" >&2
    "$@"
  fi
}

# The complete script for the workers: strict mode, the assignments NAME=VALUE (quoted),
# WORKER_BODY, BODY.
remote_script() {
  local body=$1 assignment
  shift
  printf 'set -euo pipefail\n'
  for assignment in "$@"; do
    printf '%s=%q\n' "${assignment%%=*}" "${assignment#*=}"
  done
  printf '%s%s' "$WORKER_BODY" "$body"
}

# ssh_command WORKER: in the array ssh, the gcloud command (to add --command=...) that runs a
# command on worker WORKER (a number or all) in the login shell of the TPU VM's users, bash
# (gcloud's users are made with /bin/bash).
ssh_command() {
  ssh=("${remote[@]}" ssh "$tpu" "${scope[@]}" --worker="$1" ${reach[@]+"${reach[@]}"})
}

# ssh_workers WORKER NAME SCRIPT: runs SCRIPT on worker WORKER; fails if it fails on any worker
# (gcloud's status).
ssh_workers() {
  local worker=$1 name=$2 script=$3 where status=0
  ssh_command "$worker"
  run "$(quote "${ssh[@]}") --command=<the $name script; --dry-run prints it>" \
    "${ssh[@]}" --command="$script" || status=$?
  if ((status)); then
    where="worker $worker"
    [[ $worker != all ]] || where='at least one worker'
    fail "$name failed on $where (gcloud ssh --worker=$worker: exit status $status): see the" \
      'messages above'
  fi
}

need_value() { [[ $# -ge 2 && -n $2 ]] || usage_error "$1 needs a value"; }

# --- commands ---------------------------------------------------------------------------------

default_runtime() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# Generations the Cloud TPU API (gcloud compute tpus) does not serve: TPU7x and later.
api_unsupported() { [[ $1 == tpu7x-* || $1 == tpu[89]* ]]; }

cmd_plan() {
  if [[ $# -lt 2 || $1 == -* || $2 == -* ]]; then
    usage_error 'plan needs TPU_TYPE CONFIG [FLAGS...] (e.g. v3-8 configs/cifar10.py)'
  fi
  local type=$1 config=$2 path
  shift 2
  path=${config%%:*}
  [[ -f $path ]] || usage_error "plan: no config file $path"
  config=$(cd "$(dirname "$path")" && pwd)/$(basename "$path")${config#"$path"}
  run '' env WITH_TPU=1 bash "$REPO_ROOT/launch/setup.sh"
  cd "$REPO_ROOT"
  run '' "${VENV:-.venv}/bin/python" -m benchmarks.tpu_compile --tpu="$type" \
    --config="$config" --fit "$@"
}

cmd_create() {
  local type='' version='' spot=0 queued=0 extra=() flags
  while (($#)); do
    case $1 in
      --accelerator-type) need_value "$@"; type=$2; shift ;;
      --accelerator-type=*) type=${1#*=} ;;
      --version) need_value "$@"; version=$2; shift ;;
      --version=*) version=${1#*=} ;;
      --spot) spot=1 ;;
      --queued) queued=1 ;;
      --) shift; extra=("$@"); break ;;
      *) usage_error "create: unknown argument $1 (see --help)" ;;
    esac
    shift
  done
  [[ -n $type ]] || usage_error 'create needs --accelerator-type TYPE (v3-8, v4-32, ...)'
  if api_unsupported "$type"; then
    usage_error "$type: the Cloud TPU API (gcloud compute tpus) does not support TPU7x and" \
      "later TPUs (Google develops it no further); create them with GKE: docs/cloud_tpu.md, 'TPU7x'"
  fi
  if [[ -z $version ]]; then
    version=$(default_runtime "$type") \
      || usage_error "no default runtime version for $type: pass --version RUNTIME"
  fi
  flags=(--accelerator-type="$type")
  if ((queued)); then
    flags+=(--runtime-version="$version")
    ((spot)) && flags+=(--spot)
    run '' gcloud compute tpus queued-resources create "$tpu" "${scope[@]}" --node-id="$tpu" \
      "${flags[@]}" ${extra[@]+"${extra[@]}"}
    note "queued: the TPU VM exists once the request is ACTIVE (launch/tpu.sh status;" \
      "gcloud compute tpus queued-resources describe $tpu $(quote "${scope[@]}"))"
  else
    flags+=(--version="$version")
    ((spot)) && flags+=(--spot)
    run '' gcloud compute tpus tpu-vm create "$tpu" "${scope[@]}" "${flags[@]}" \
      ${extra[@]+"${extra[@]}"}
  fi
  note "next: $PROG push, then $PROG setup (and $PROG plan $type CONFIG, if not done yet:" \
    "whether the run fits this TPU, checked here before the TPU bills)"
}

# The commit id of $1 (HEAD, an id, a branch) in this checkout.
commit_id() {
  git -C "$REPO_ROOT" rev-parse --verify --quiet "$1^{commit}" \
    || fail "no commit $1 in $REPO_ROOT: push and setup send a commit of this git checkout"
}

# The commit that push sends by default: HEAD, without uncommitted changes to tracked files
# unless $1 (--allow-dirty).
head_commit() {
  local allow_dirty=$1 commit
  commit=$(commit_id HEAD)
  if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
    if ((allow_dirty)); then
      note "uncommitted changes are NOT pushed: only commit $commit is (--allow-dirty)"
    elif ((dry_run)); then
      note "uncommitted changes: push would refuse them (commit them, or --allow-dirty)"
    else
      usage_error "uncommitted changes in $REPO_ROOT: push sends only the current commit," \
        "so that every host runs it; commit them (or pass --allow-dirty to push $commit anyway)"
    fi
  fi
  echo "$commit"
}

cmd_push() {
  local allow_dirty=0 commit='' tmp archive
  while (($#)); do
    case $1 in
      --allow-dirty) allow_dirty=1 ;;
      --commit) need_value "$@"; commit=$2; shift ;;
      --commit=*) commit=${1#*=} ;;
      *) usage_error "push: unknown argument $1 (see --help)" ;;
    esac
    shift
  done
  if [[ -n $commit ]]; then
    commit=$(commit_id "$commit")
  else
    commit=$(head_commit "$allow_dirty")
  fi
  if ((dry_run)); then
    archive=${TMPDIR:-/tmp}/diffusion_jax.tar.gz
  else
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064  # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
    archive=$tmp/diffusion_jax.tar.gz
  fi
  run '' git -C "$REPO_ROOT" archive --format=tar.gz -o "$archive" "$commit"
  run '' "${remote[@]}" scp "$archive" "$tpu:~/diffusion_jax.tar.gz" --worker=all "${scope[@]}" \
    ${reach[@]+"${reach[@]}"}
  ssh_workers all push "$(remote_script "$PUSH_BODY" "commit=$commit")"
}

cmd_setup() {
  local lock=requirements.txt lock_sum commit=HEAD
  while (($#)); do
    case $1 in
      --commit) need_value "$@"; commit=$2; shift ;;
      --commit=*) commit=${1#*=} ;;
      *) usage_error "setup: unknown argument $1 (see --help)" ;;
    esac
    shift
  done
  case $python_version in
    3.11) lock=requirements-py311.txt ;;
    3.12 | 3.13) ;;
    *) usage_error "PYTHON_VERSION=$python_version: the supported ones are 3.11, 3.12 and 3.13" ;;
  esac
  commit=$(commit_id "$commit")
  git -C "$REPO_ROOT" cat-file -e "$commit:$lock" 2>/dev/null || fail "commit $commit has no $lock"
  lock_sum=$(git -C "$REPO_ROOT" show "$commit:$lock" | sha1sum | cut -c1-40)
  ssh_workers all setup "$(remote_script "$SETUP_BODY" "commit=$commit" "lock=$lock" \
    "lock_sum=$lock_sum" "python_version=$python_version")"
}

cmd_train() {
  local config workdir args arg prelude start_check_seconds=${START_CHECK_SECONDS:-10}
  if [[ $# -lt 2 || $1 == -* || $2 == -* ]]; then
    usage_error 'train needs CONFIG WORKDIR [FLAGS...] (e.g. configs/cifar10.py gs://BUCKET/cifar10)'
  fi
  config=$1 workdir=$2
  shift 2
  [[ $start_check_seconds =~ ^[0-9]+$ ]] \
    || usage_error "START_CHECK_SECONDS takes seconds, not $start_check_seconds"
  [[ $workdir == gs://* ]] || note "WORKDIR $workdir is a folder on each host: fine on one host;" \
    "a multi-host slice needs gs://BUCKET/... (one checkpoint directory for all hosts)"
  args=(-m diffusion_jax.main --config="$config" --workdir="$workdir" --distributed
    --jax_compilation_cache_dir="${workdir%/}/jax_cache" "$@")
  prelude=$(remote_script '' "workdir=$workdir" "log_sync_seconds=${LOG_SYNC_SECONDS:-60}" \
    "start_check_seconds=$start_check_seconds")
  prelude+=$'\nargs=('
  for arg in "${args[@]}"; do
    prelude+=$(printf ' %q' "$arg")
  done
  prelude+=$' )\n'
  ssh_workers all train "$prelude$TRAIN_BODY"
  note "follow it: $PROG logs --follow; end it: $PROG stop"
}

cmd_logs() {
  local worker=0 follow='' lines=100 prefix=0
  while (($#)); do
    case $1 in
      --worker) need_value "$@"; worker=$2; shift ;;
      --worker=*) worker=${1#*=} ;;
      --follow | -f) follow=-F ;;
      --lines | -n) need_value "$@"; lines=$2; shift ;;
      --lines=*) lines=${1#*=} ;;
      *) usage_error "logs: unknown argument $1 (see --help)" ;;
    esac
    shift
  done
  [[ $worker == all || $worker =~ ^[0-9]+$ ]] || usage_error "--worker takes a number or all, not $worker"
  [[ $lines =~ ^[0-9]+$ ]] || usage_error "--lines takes a number, not $lines"
  [[ $worker == all ]] && prefix=1
  ssh_workers "$worker" logs \
    "$(remote_script "$LOGS_BODY" "lines=$lines" "follow=$follow" "prefix=$prefix")"
}

cmd_status() {
  (($# == 0)) || usage_error "status takes no arguments (got $1)"
  local format='yaml(name,acceleratorType,runtimeVersion,state,health,healthDescription,schedulingConfig)'
  if ! run '' gcloud compute tpus tpu-vm describe "$tpu" "${scope[@]}" --format="$format"; then
    note "no TPU VM $tpu in $zone; a queued resource of that name:"
    run '' gcloud compute tpus queued-resources describe "$tpu" "${scope[@]}" || true
    exit 1
  fi
  ssh_workers all status "$(remote_script "$STATUS_BODY")"
}

cmd_stop() {
  local grace=120
  while (($#)); do
    case $1 in
      --grace) need_value "$@"; grace=$2; shift ;;
      --grace=*) grace=${1#*=} ;;
      *) usage_error "stop: unknown argument $1 (see --help)" ;;
    esac
    shift
  done
  [[ $grace =~ ^[0-9]+$ ]] || usage_error "--grace takes seconds, not $grace"
  ssh_workers all stop "$(remote_script "$STOP_BODY" "grace=$grace")"
}

cmd_delete() {
  local queued=0
  while (($#)); do
    case $1 in
      --queued) queued=1 ;;
      *) usage_error "delete: unknown argument $1 (see --help)" ;;
    esac
    shift
  done
  if ((queued)); then
    run '' gcloud compute tpus queued-resources delete "$tpu" "${scope[@]}" --force --quiet
  else
    run '' gcloud compute tpus tpu-vm delete "$tpu" "${scope[@]}" --quiet
  fi
}

# --- watch: these run inside cmd_watch and use its variables ------------------------------------

# One line of the watcher, with the time: on stderr and in its log.
note_watch() {
  local line
  line="$(date -u +%FT%TZ) $*"
  echo "$PROG: watch: $line" >&2
  echo "$line" >> "$log_file"
}

# describe_state KIND FORMAT: the state that `gcloud compute tpus KIND describe` gives, GONE if
# there is no such resource, UNKNOWN if gcloud cannot tell (noted).
describe_state() {
  local state
  if state=$(gcloud compute tpus "$1" describe "$tpu" "${scope[@]}" --format="$2" 2> "$errors"); then
    echo "${state:-UNKNOWN}"
  elif grep -qE 'NOT_FOUND|not found' "$errors"; then
    echo GONE
  else
    note_watch "gcloud compute tpus $1 describe failed: $(tail -n 1 "$errors")"
    echo UNKNOWN
  fi
}

# The TPU's state: its node's (READY, CREATING, PREEMPTED, TERMINATED, ...); with --queued the
# queued resource's until it is ACTIVE (WAITING_FOR_RESOURCES, SUSPENDED, FAILED, ...), then its
# node's, VM_GONE if that is gone.
tpu_state() {
  local state
  if ((queued)); then
    state=$(describe_state queued-resources 'value(state.state)')
    if [[ $state != ACTIVE ]]; then
      echo "$state"
      return
    fi
  fi
  state=$(describe_state tpu-vm 'value(state)')
  if ((queued)) && [[ $state == GONE ]]; then
    state=VM_GONE
  fi
  echo "$state"
}

# Sets run (RUN_STATE_BODY's state of worker 0's run; unreachable if ssh fails) and detail (the
# lines before it, or ssh's error).
read_run_state() {
  local out
  ssh_command 0
  if out=$("${ssh[@]}" --command="$(remote_script "$RUN_STATE_BODY")" 2> "$errors") \
    && [[ $out == *'run: '* ]]; then
    run=${out##*run: }
    detail=${out%run: *}
  else
    run=unreachable
    detail=$(tail -n 3 "$errors")
  fi
  detail=${detail%$'\n'}
}

# Counts a restart, for the reason $1; past max_restarts, watch gives up.
count_restart() {
  restarts=$((restarts + 1))
  if ((restarts > max_restarts)); then
    note_watch "giving up: $1, but all $max_restarts restarts are used (--max-restarts)"
    exit 1
  fi
  note_watch "restart $restarts/$max_restarts: $1"
}

# The TPU anew: deleted unless it is GONE ($1), then created with the watched arguments.
recreate() {
  local delete=(delete)
  ((!queued)) || delete+=(--queued)
  if [[ $1 != GONE ]]; then
    "${self[@]}" "${delete[@]}" || return
  fi
  "${self[@]}" create "${create[@]}"
}

# The run on the TPU: push and setup of the watched commit, then train.
start_run() {
  "${self[@]}" push --commit "$commit" && "${self[@]}" setup --commit "$commit" \
    && "${self[@]}" train "${train[@]}"
}

# Exits with COMMAND's own usage error if COMMAND ARGS... is not a valid command (its --dry-run).
check_command() {
  local error status=0
  error=$("${self[@]}" --dry-run "$@" 2>&1 > /dev/null) || status=$?
  if ((status)); then
    printf '%s\n' "$error" >&2
    exit "$status"
  fi
}

cmd_watch() {
  local poll=${WATCH_POLL_SECONDS:-60} max_restarts=${WATCH_MAX_RESTARTS:-10} log_file
  local create=() train=() self queued=0 commit errors arg
  local idle_seconds=${WATCH_IDLE_SECONDS:-120} idle_since=-1 state run seen='' seen_run='' detail
  local restarts=0 started=0 fresh=0
  log_file=${WATCH_LOG:-${XDG_STATE_HOME:-$HOME/.local/state}/diffusion_jax/watch_$tpu.log}
  while (($#)) && [[ $1 != create ]]; do
    case $1 in
      --poll) need_value "$@"; poll=$2; shift ;;
      --poll=*) poll=${1#*=} ;;
      --max-restarts) need_value "$@"; max_restarts=$2; shift ;;
      --max-restarts=*) max_restarts=${1#*=} ;;
      --log) need_value "$@"; log_file=$2; shift ;;
      --log=*) log_file=${1#*=} ;;
      *) usage_error "watch: unknown argument $1 (see --help)" ;;
    esac
    shift
  done
  [[ $poll =~ ^[0-9]+([.][0-9]+)?$ ]] || usage_error "--poll takes seconds, not $poll"
  [[ $max_restarts =~ ^[0-9]+$ ]] || usage_error "--max-restarts takes a number, not $max_restarts"
  [[ $idle_seconds =~ ^[0-9]+$ ]] || usage_error "WATCH_IDLE_SECONDS takes seconds, not $idle_seconds"
  (($#)) && shift  # create
  while (($#)) && [[ $1 != train ]]; do
    create+=("$1")
    shift
  done
  (($#)) || usage_error 'watch needs create CREATE_ARGS... train CONFIG WORKDIR [FLAGS...]'
  shift
  train=("$@")
  self=("${BASH_SOURCE[0]}" --tpu "$tpu" --zone "$zone")
  [[ -z $project ]] || self+=(--project "$project")
  ((!internal_ip)) || self+=(--internal-ip)
  ((!iap)) || self+=(--tunnel-through-iap)
  check_command create ${create[@]+"${create[@]}"}
  check_command train ${train[@]+"${train[@]}"}
  for arg in "${create[@]}"; do
    [[ $arg != -- ]] || break  # gcloud's flags follow
    [[ $arg != --queued ]] || queued=1
  done
  commit=$(head_commit 0)
  mkdir -p "$(dirname "$log_file")"
  errors=$(mktemp)
  # shellcheck disable=SC2064  # expand $errors now
  trap "rm -f '$errors'" EXIT
  note_watch "watching TPU $tpu ($zone) for commit $commit: a look every ${poll}s, at most" \
    "$max_restarts restarts; this log: $log_file"
  while true; do
    state=$(tpu_state)
    [[ $state == "$seen" ]] || note_watch "TPU $state"
    seen=$state
    case $state in
      PREEMPTED | TERMINATED | SUSPENDED | FAILED | GONE | VM_GONE)
        if ((started)); then
          count_restart "TPU $state: creating it again"
        fi
        recreate "$state" || note_watch "could not create the TPU: trying again in ${poll}s"
        fresh=1 seen_run=''
        ;;
      READY)
        read_run_state
        [[ $run == "$seen_run" ]] || note_watch "run $run on worker 0"
        [[ $run != unreachable || $seen_run == unreachable ]] || note_watch "ssh: $detail"
        seen_run=$run
        case $run in
          running) started=1 idle_since=-1 ;;
          done)
            note_watch "the run is complete: $detail"
            return
            ;;
          failed)
            note_watch "the run failed: watch ends without restarting it; the end of its log:"
            printf '%s\n' "$detail" | tee -a "$log_file" >&2
            exit 1
            ;;
          none | stopped)
            # On a TPU that had the run, after idle_seconds: a preempted TPU may still say READY.
            ((idle_since >= 0)) || idle_since=$SECONDS
            if ((!started || fresh || SECONDS - idle_since >= idle_seconds)); then
              if ((started && !fresh)); then
                count_restart "TPU READY, run $run: starting it again"
              fi
              if start_run; then
                started=1
              elif ((!started)); then
                fail 'watch: the run could not be started (see above)'
              else
                note_watch "could not start the run: trying again in ${poll}s"
              fi
              fresh=0 idle_since=-1
            fi
            ;;
          unreachable) ;;  # ask again at the next look
        esac
        ;;
    esac
    sleep "$poll"
  done
}

main() {
  while (($#)); do
    case $1 in
      --tpu) need_value "$@"; tpu=$2; shift ;;
      --tpu=*) tpu=${1#*=} ;;
      --zone) need_value "$@"; zone=$2; shift ;;
      --zone=*) zone=${1#*=} ;;
      --project) need_value "$@"; project=$2; shift ;;
      --project=*) project=${1#*=} ;;
      --internal-ip) internal_ip=1 ;;
      --tunnel-through-iap) iap=1 ;;
      --dry-run) dry_run=1 ;;
      -h | --help | help) usage; exit 0 ;;
      -*) usage_error "unknown option $1 (see --help)" ;;
      *) break ;;
    esac
    shift
  done
  (($#)) || usage_error 'no command (plan, create, push, setup, train, logs, status, stop,' \
    'delete, watch; see --help)'
  local command=$1
  shift
  if [[ $command == plan ]]; then  # on this machine: no TPU name or zone
    [[ ${1:-} != -h && ${1:-} != --help ]] || { usage; exit 0; }
    cmd_plan "$@"
    return
  fi
  case $command in
    create | push | setup | train | logs | status | stop | delete | watch) ;;
    *) usage_error "unknown command $command (see --help)" ;;
  esac
  if ((dry_run)) && [[ $command == watch ]]; then
    usage_error 'watch acts on the states it sees: it has no --dry-run (its create and train do)'
  fi
  if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
  fi
  [[ -n $tpu ]] || usage_error 'no TPU name: pass --tpu NAME or set TPU_NAME'
  [[ -n $zone ]] || usage_error 'no zone: pass --zone ZONE (e.g. us-central1-a) or set ZONE'
  [[ $internal_ip == [01] ]] || usage_error "TPU_INTERNAL_IP is 1 or 0, not $internal_ip"
  [[ $iap == [01] ]] || usage_error "TPU_TUNNEL_THROUGH_IAP is 1 or 0, not $iap"
  scope=(--zone="$zone")
  [[ -z $project ]] || scope+=(--project="$project")
  remote=(gcloud compute tpus tpu-vm)
  if ((internal_ip && iap)); then
    usage_error '--internal-ip and --tunnel-through-iap exclude each other'
  elif ((internal_ip)); then
    reach=(--internal-ip)
  elif ((iap)); then
    remote=(gcloud alpha compute tpus tpu-vm)  # the GA ssh and scp have no --tunnel-through-iap
    reach=(--tunnel-through-iap)
  fi
  "cmd_$command" "$@"
}

main "$@"
