#!/usr/bin/env bash
# Plan: the modules' dependency arrows (README.md, "Layout") hold in the source, not only in the link
# lines: each module includes only tandem headers of modules it may depend on. A violation
# prints the offending line and fails.
set -euo pipefail
root=${1:?usage: layering_test.sh SOURCE_DIR}
declare -A allowed=(
  [common]="common"
  [engine]="common engine"
  [frontend]="common engine frontend"
  [transport]="common transport"
  [replication]="common engine transport replication"
  [importer]="common engine importer"
  [api]="common engine transport replication importer api"
  [daemon]="common engine frontend transport replication importer api daemon"
)
bad=0
for mod in "${!allowed[@]}"; do
  [ -d "$root/$mod" ] || continue
  while IFS= read -r line; do
    file=${line%%:*}
    dep=$(sed -E 's/.*#include [<"]tandem\/([a-z_]+)\/.*/\1/' <<<"$line")
    if ! grep -qw -- "$dep" <<<"${allowed[$mod]}"; then
      echo "layering violation: $mod may not include $dep: $line"
      bad=1
    fi
  done < <(grep -rnE '#include [<"]tandem/[a-z_]+/' "$root/$mod" || true)
done
if [ "$bad" -ne 0 ]; then exit 1; fi
echo "layering: ok"
