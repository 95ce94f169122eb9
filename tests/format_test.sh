#!/usr/bin/env bash
# Every C++ file under version control is formatted as the root .clang-format says. A file that
# is not is named with the first lines clang-format would change; run
#   git ls-files '*.cpp' '*.h' | xargs clang-format -i
# to apply it.
set -euo pipefail
root=${1:?usage: format_test.sh SOURCE_DIR}
cd "$root"
command -v clang-format >/dev/null || { echo "format_test: clang-format is not installed" >&2; exit 1; }
[ -f .clang-format ] || { echo "format_test: no .clang-format at $root" >&2; exit 1; }
bad=0
while IFS= read -r -d '' f; do
  if ! out=$(clang-format --dry-run -Werror "$f" 2>&1); then
    echo "$out" | head -6
    bad=$((bad + 1))
  fi
done < <(git ls-files -z '*.cpp' '*.h' 2>/dev/null || find common engine frontend transport replication api daemon tests bench \( -name '*.cpp' -o -name '*.h' \) -print0)
if [ "$bad" -ne 0 ]; then
  echo "format_test: $bad file(s) not formatted" >&2
  exit 1
fi
echo "format_test: every C++ file is formatted"
