#!/usr/bin/env bash
# Before/after on one machine: the bench harnesses of two source trees, alternated.
#   bash bench/compare_versions.sh BEFORE_TREE AFTER_TREE OUT_DIR [ROUNDS]
# e.g. git worktree add /tmp/before <commit>; bash bench/compare_versions.sh /tmp/before . /tmp/out
# Runs from a neutral directory: `python -m shmrunner.cli worker` would otherwise
# import the tree in the current directory, whichever PYTHONPATH says.
set -u
before=$(cd "$1" && pwd); after=$(cd "$2" && pwd); out=$(mkdir -p "$3" && cd "$3" && pwd)
rounds=${4:-2}
py="$(cd "$(dirname "$0")" && pwd)/.venv/bin/python"
cd "$(mktemp -d)"
for round in $(seq 1 "$rounds"); do
  for tag in before after; do
    dir=$before; [ "$tag" = after ] && dir=$after
    PYTHONPATH=$dir timeout 900 "$py" "$dir/bench/bench_local.py" --reps 3 --systems mp,shmrunner \
      --out "$out/$tag-local-$round.md" > "$out/$tag-local-$round.log" 2>&1
    PYTHONPATH=$dir timeout 900 "$py" "$dir/bench/bench_remote.py" --reps 3 \
      --systems remote,zmq,sched,pool --out "$out/$tag-remote-$round.md" > "$out/$tag-remote-$round.log" 2>&1
    PYTHONPATH=$dir timeout 900 "$py" "$dir/bench/bench_daemon.py" --reps 3 \
      --systems daemon,dlocal,remote --kill-at "" --out "$out/$tag-daemon-$round.md" \
      > "$out/$tag-daemon-$round.log" 2>&1
  done
done
