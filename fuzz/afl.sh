#!/usr/bin/env bash
# Coverage-guided fuzzing of every keybroker-fuzz target with AFL++ (through afl.rs), on the
# stable toolchain; then one table of inputs, time, panics (crashes) and hangs per target.
#
#   fuzz/afl.sh [--inputs N] [--seconds S] [TARGET...]
#
# N inputs per target (default 1000000; AFL++ stops at about that count), at most S seconds per
# target (default 900). cargo-afl and AFL++ are built once into $KEYBROKER_AFL_HOME (default
# ~/.cache/keybroker/afl); the instrumented harness is built into $TARGET_DIR/afl so it does not
# disturb the normal builds. A crash or hang fails the run and names the saved input.
set -euo pipefail

AFL_VERSION=0.18.2
inputs=1000000
seconds=900
targets=()
while (($#)); do
	case "$1" in
	--inputs) inputs="$2"; shift 2 ;;
	--seconds) seconds="$2"; shift 2 ;;
	-h | --help) sed -n '2,10p' "$0"; exit 0 ;;
	*) targets+=("$1"); shift ;;
	esac
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
CARGO="${CARGO:-cargo}"
TARGET_DIR="${TARGET_DIR:-${CARGO_TARGET_DIR:-target}}"
home="${KEYBROKER_AFL_HOME:-$HOME/.cache/keybroker/afl}"
# afl.rs keeps AFL++ and its runtime object under the XDG data directory; pin it to the cache.
export XDG_DATA_HOME="$home/data"
cargo_afl="$home/bin/cargo-afl"

rustc_id="$(rustc -vV | awk '/^release:/ {r=$2} /^commit-hash:/ {h=substr($2,1,7)} END {print r "-" h}')"
afl_fuzz="$XDG_DATA_HOME/afl.rs/rustc-$rustc_id/afl.rs-$AFL_VERSION/afl/bin/afl-fuzz"
if [[ ! -x "$cargo_afl" ]] || ! "$cargo_afl" afl --version 2>/dev/null | grep -q "$AFL_VERSION"; then
	command -v make >/dev/null && command -v cc >/dev/null || {
		echo "building AFL++ needs make and a C compiler: apt-get install build-essential" >&2
		exit 1
	}
	echo "building cargo-afl $AFL_VERSION and AFL++ into $home (once)..." >&2
	# cargo-afl's build script compiles the AFL++ it bundles (no download besides the crate).
	"$CARGO" install --locked --force --root "$home" cargo-afl --version "$AFL_VERSION"
fi
if [[ ! -x "$afl_fuzz" ]]; then
	# A new rustc: AFL++'s runtime is kept per compiler version.
	PATH="$home/bin:$PATH" "$CARGO" afl config --build --force
fi
[[ -x "$afl_fuzz" ]] || { echo "afl-fuzz was not built at $afl_fuzz" >&2; exit 1; }

# The driver writes the seeds and reads the stats: the test profile's build, which `make test`
# has made already. Only the harness needs the instrumented (and optimized) build.
"$CARGO" build -q --locked -p keybroker-fuzz --bin keybroker-fuzz
driver="$TARGET_DIR/debug/keybroker-fuzz"
echo "building the instrumented harness (first time: several minutes)..." >&2
CARGO_TARGET_DIR="$TARGET_DIR/afl" PATH="$home/bin:$PATH" \
	"$CARGO" afl build --release --locked -p keybroker-fuzz --features afl --bin keybroker-fuzz-afl
harness="$TARGET_DIR/afl/release/keybroker-fuzz-afl"

work="$TARGET_DIR/fuzz/afl"
rm -rf "$work"
mkdir -p "$work"
"$driver" seeds "$work/seeds"
if ((${#targets[@]} == 0)); then
	mapfile -t targets < <("$driver" list | awk '{print $1}')
fi

# No core-dump helper, no CPU pinning (the machine is shared), no UI; the harness itself fails
# an input over its CPU time bound, -t is only the backstop for a real hang.
export AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
for t in "${targets[@]}"; do
	echo "fuzzing $t: $inputs inputs or ${seconds}s..." >&2
	"$afl_fuzz" -i "$work/seeds/$t" -o "$work/$t" -x "$work/seeds/$t.dict" \
		-t 1000 -E "$inputs" -V "$seconds" -- "$harness" "$t" >"$work/$t.log" 2>&1 || {
		echo "afl-fuzz failed for $t; its output:" >&2
		tail -30 "$work/$t.log" >&2
		exit 1
	}
done
"$driver" afl-report "$work" --min-inputs "$inputs" "${targets[@]}"
