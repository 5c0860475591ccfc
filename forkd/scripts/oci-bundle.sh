#!/usr/bin/env bash
# Build the OCI bundle the container tests and benchmark run: a rootfs that
# is not the host's (its own /etc/os-release, a Python module only it has,
# its own copy of Debian's CPython 3.11 and boto3), and a config.json from
# `runc spec` that runs the function in forkd/tests/programs/container/.
#
#   forkd/scripts/oci-bundle.sh OUT_DIR
#
# Rebuilt only when this script or the function changed (a stamp in OUT_DIR).
set -euo pipefail
out="$1"
here="$(cd "$(dirname "$0")/.." && pwd)"
fn_dir="$here/tests/programs/container"
stamp="$(cat "$0" "$fn_dir"/* | sha256sum | cut -c1-16)"
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ]; then
    exit 0
fi
command -v runc >/dev/null || { echo "oci-bundle: runc is not installed" >&2; exit 1; }
PY=/usr/bin/python3.11
[ -x "$PY" ] || { echo "oci-bundle: $PY (Debian's python3.11) is missing" >&2; exit 1; }
PYTHON="${PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}"

rm -rf "$out.new"
mkdir -p "$out.new/rootfs"
r="$out.new/rootfs"
mkdir -p "$r"/{usr/bin,usr/lib/x86_64-linux-gnu,usr/lib64,etc,tmp,proc,sys,dev,root,app,var/tmp}
chmod 1777 "$r/tmp" "$r/var/tmp"
ln -s usr/bin "$r/bin"
ln -s usr/lib "$r/lib"
ln -s usr/lib64 "$r/lib64"

# The interpreter, its standard library (without its tests), and every
# shared library it and its extension modules load.
cp -a "$PY" "$r/usr/bin/python3.11"
ln -s python3.11 "$r/usr/bin/python3"
tar -C /usr/lib --exclude=python3.11/test --exclude='__pycache__' -cf - python3.11 | tar -C "$r/usr/lib" -xf -
libs=$( { ldd "$PY"; for so in /usr/lib/python3.11/lib-dynload/*.so; do ldd "$so"; done; } 2>/dev/null \
        | awk '/=> \//{print $3} /^\t\/lib64/{print $1}' | sort -u)
for l in $libs; do
    real="$(readlink -f "$l")"
    case "$l" in
        /lib64/*) cp -L "$real" "$r/usr/lib64/$(basename "$l")" ;;
        *) cp -L "$real" "$r/usr/lib/x86_64-linux-gnu/$(basename "$l")" ;;
    esac
done

# boto3, where Debian's python looks for packages.
"$PYTHON" -m pip install -q --no-compile --no-warn-conflicts --root-user-action=ignore --disable-pip-version-check --target "$r/usr/lib/python3/dist-packages" boto3

# What only this rootfs has.
cat > "$r/etc/os-release" <<'OS'
PRETTY_NAME="remotefork test rootfs 1"
NAME="remotefork-rootfs"
ID=remotefork-rootfs
VERSION_ID="1"
OS
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$r/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$r/etc/group"
echo rf-container > "$r/etc/hostname"
printf 'VALUE = "only in the container rootfs"\n' > "$r/usr/lib/python3/dist-packages/rf_container_only.py"
cp "$fn_dir"/*.py "$r/app/"

# The runtime configuration: runc's defaults (pid, ipc, uts, mount and
# network namespaces), without a terminal, its root writable (children
# write to a layer of their own over it).
(cd "$out.new" && runc spec)
"$PYTHON" - "$out.new/config.json" <<'PYCFG'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["/usr/bin/python3.11", "-u", "/app/fn.py"]
c["process"]["env"] = ["PATH=/usr/bin", "HOME=/root", "LANG=C.UTF-8"]
c["process"]["cwd"] = "/app"
c["root"]["readonly"] = False
c["hostname"] = "rf-container"
json.dump(c, open(p, "w"), indent=2)
PYCFG
echo "$stamp" > "$out.new/.stamp"
rm -rf "$out"
mv "$out.new" "$out"
