#!/usr/bin/env bash
# Ask times in the PythonQt host for poll settings (POLL_MS YIELD_MS pairs); prints one line per setting.
cd "$(dirname "$0")/../.."
eval "$(/work/shared/pythonqt/build.sh --env)"
for pair in "$@"; do
  set -- $pair
  MEDIROUND_POLL_MS=$1 MEDIROUND_YIELD_MS=$2 MEDIROUND_OUT=$(mktemp -d) MEDIROUND_ROOT=$PWD MEDIROUND_SITE=/work/main/.venv/lib/python3.11/site-packages QT_QPA_PLATFORM=offscreen timeout 300 $PQHOST tests/pythonqt/host_panel_session.py --exec 240000 2>&1 | grep PQRESULT | python3 -c "import json,sys; d=json.loads(sys.stdin.read()[9:]); print('poll', $1, 'yield', $2, [round(a['seconds'],2) for a in d['asks']], d['errors'])"
done
