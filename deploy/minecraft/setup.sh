#!/usr/bin/env bash
# Install the Minecraft kit (flying-squid server, mineflayer bots) into build/minecraft.
# Idempotent: a stamp of the lock file and the node version makes a second run a no-op.
#   bash deploy/minecraft/setup.sh            # FERRY_MINECRAFT_BUILD overrides the target dir
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD="${FERRY_MINECRAFT_BUILD:-$REPO/build/minecraft}"

command -v node >/dev/null || { echo "minecraft setup: node is not installed" >&2; exit 1; }
major="$(node -p 'process.versions.node.split(".")[0]')"
# The pinned set (see package.json) is the newest whose packages all still run on Node 20.
[ "$major" = 20 ] || echo "minecraft setup: warning: pinned for Node 20, found $(node --version)" >&2

mkdir -p "$BUILD"
# The scripts are cheap to copy and must sit beside node_modules for require() to find it.
install -m 0644 "$HERE/server.js" "$HERE/bots.js" "$BUILD/"

stamp="$(cat "$HERE/package.json" "$HERE/package-lock.json" | sha256sum | cut -c1-16)-$(node --version)"
if [ -d "$BUILD/node_modules" ] && [ "$(cat "$BUILD/.stamp" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi

install -m 0644 "$HERE/package.json" "$HERE/package-lock.json" "$BUILD/"
rm -f "$BUILD/.stamp"
echo "minecraft setup: npm ci into $BUILD" >&2
(cd "$BUILD" && npm ci --no-audit --no-fund --loglevel=error >&2)
echo "$stamp" > "$BUILD/.stamp"
