#!/usr/bin/env bash
# Benchmarks datamover against restic and rclone on the same Garage, in one run, and
# writes bench/RESULTS-latest.md. Builds the newest restic and rclone from the Go module
# proxy (scripts/ensure-bench-tools.sh), installs rustic (cargo install rustic-rs, where it
# installs) and Garage when missing; kopia joins where KOPIA_BIN names a kopia binary (this
# project does not build kopia). Options are passed to the bench binary (--help):
#   --reps N (3)  --scale F (1.0: ~1 GiB mixed data)  --stream-mib N (1024)  --no-toolchain
#   --datasets mixed,toolchain,stream,many,sync,browse,gateway  --tools datamover,restic,rustic,rclone,kopia-server,kopia
#   --many-files N (1000000)  --many-reps N (1)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# restic and rclone at their newest releases, built once from the Go module proxy
# (scripts/ensure-bench-tools.sh), first on PATH.
PATH="$(scripts/ensure-bench-tools.sh):$PATH"
export PATH
if ! command -v rustic >/dev/null; then
  # rustic is compared where it installs; without it the bench runs the other tools.
  cargo install rustic-rs --locked >&2 || echo "bench.sh: rustic did not install: it is left out" >&2
fi
GARAGE_BIN="$(scripts/ensure-garage.sh)"
export GARAGE_BIN

cargo build --release --workspace --bins --locked
export DATAMOVER_BIN_DIR="$PWD/target/release"

# Where the data sets, restores and Garage's data go: $BENCH_WORK if set; else, when
# this runs as root with loop devices, a fresh journaled ext4 file system in an image
# under target/ (removed afterwards); else the temp dir. On an ext4 without a journal
# (the root file system of some VMs) creating files is up to 20 times slower for minutes
# after files were deleted nearby, whichever tool does it; the bench waits for that to
# pass before every run (Bench::quiesce) but a fresh file system avoids the wait.
work="${BENCH_WORK:-}"
mnt=""
loopdev=""
if [[ -z "$work" && "$(id -u)" == 0 ]] && command -v mkfs.ext4 >/dev/null; then
  img="$PWD/target/bench-fs.img"
  mnt="$PWD/target/bench-fs"
  mkdir -p "$mnt"
  rm -f "$img"
  # The loop device does direct I/O where it can: otherwise every page read or written
  # in the image is cached and copied a second time, in the image file's page cache, by
  # kernel threads whose CPU no tool is charged for but all of them wait on.
  if truncate -s 96G "$img" && mkfs.ext4 -q -F -i 4096 "$img" &&
    { loopdev="$(losetup --direct-io=on -f --show "$img" 2>/dev/null)" ||
      loopdev="$(losetup -f --show "$img")"; } &&
    mount "$loopdev" "$mnt"; then
    work="$mnt"
  else
    echo "bench.sh: cannot mount a file system image: using the temp dir" >&2
    if [[ -n "$loopdev" ]]; then losetup -d "$loopdev" 2>/dev/null || true; fi
    loopdev=""
    rm -f "$img"
    mnt=""
  fi
fi
cleanup() {
  if [[ -n "$mnt" ]]; then
    umount "$mnt" || true
    if [[ -n "$loopdev" ]]; then losetup -d "$loopdev" 2>/dev/null || true; fi
    rm -f "$img"
  fi
}
trap cleanup EXIT
if [[ -n "$work" ]]; then
  export TMPDIR="$work"
  target/release/datamover-bench --output bench/RESULTS-latest.md --work "$work" "$@"
else
  target/release/datamover-bench --output bench/RESULTS-latest.md "$@"
fi
