#!/usr/bin/env bash
# buf breaking: proto/ (as in the working tree) must not break the contract of the previous
# commit. On main that is the previous main (HEAD~1 follows the first parent of a merge).
# QUOTAD_PROTO_BASE=<ref> compares against another ref (e.g. origin/main on a branch).
#
# It never passes silently for want of history: a shallow clone fails and says how to fix
# it; only a repository whose first commit is HEAD (no contract before it) passes as is.
set -euo pipefail
cd "$(dirname "$0")/.."
base="${QUOTAD_PROTO_BASE:-HEAD~1}"
buf="${BUF:-buf}"

if ! git rev-parse --verify --quiet "${base}^{commit}" >/dev/null; then
    if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
        echo "proto-breaking: $base is not in this shallow clone; run 'git fetch --unshallow'" >&2
        exit 1
    fi
    if [ -z "${QUOTAD_PROTO_BASE:-}" ] && [ "$(git rev-list --count HEAD)" = 1 ]; then
        echo "proto-breaking: HEAD is the first commit, no earlier contract to break"
        exit 0
    fi
    echo "proto-breaking: unknown ref $base" >&2
    exit 1
fi

against="$(mktemp -d)"
trap 'rm -rf "$against"' EXIT
if ! git archive "$base" proto | tar -x -C "$against" 2>/dev/null; then
    echo "proto-breaking: $base has no proto/, no earlier contract to break"
    exit 0
fi
"$buf" breaking proto --against "$against/proto"
echo "proto-breaking: proto/ keeps the contract of $base ($(git rev-parse --short "$base"))"
