#!/usr/bin/env bash
# The local demo: a datamover-server on the filesystem store, a directory backed up and
# restored through it by datamover-client, and the two trees compared.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

cargo build --workspace --bins --locked
bin=target/debug

demo=$(mktemp -d -t datamover-demo.XXXXXX)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 51515)
http_port=$((port + 1))

# The server's side of the pod: repository password and one client credential.
mkdir -p "$demo/server/etc/secrets/repo" "$demo/server/etc/client_credentials"
head -c 24 /dev/urandom | base64 > "$demo/server/etc/secrets/repo/repo-password"
token=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
printf '%s' "$token" > "$demo/server/etc/client_credentials/demo-client"

echo "== starting datamover-server (filesystem store in $demo/server/var/lib/datamover)"
DATAMOVER_ROOT="$demo/server" PROTOCOLS="datamover-v1:$port" DATAMOVER_LISTEN_HOST=127.0.0.1 \
  DATAMOVER_HTTP_ADDR="127.0.0.1:$http_port" "$bin/datamover-server" > "$demo/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 200); do
  [ -s "$demo/server/etc/server/data" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$demo/server.log"; exit 1; }
  sleep 0.1
done
fingerprint=$(cat "$demo/server/etc/server/data")
echo "   server certificate fingerprint (/etc/server/data): $fingerprint"

# The client's side: only its own credential, and the server's fingerprint to pin.
mkdir -p "$demo/client/etc/client-secret"
printf '%s' "$token" > "$demo/client/etc/client-secret/demo-client"
export DATAMOVER_ROOT="$demo/client" SERVER_URL="127.0.0.1:$port" PROTOCOLS="datamover-v1:$port" SERVER_DATA="$fingerprint"

src="$demo/data"
mkdir -p "$src/docs" "$src/empty"
cp -r README.md proto "$src/docs/"
head -c 8000000 /dev/urandom > "$src/random.bin"
ln -s docs/README.md "$src/readme-link"

echo "== backup_files $src demo"
"$bin/datamover-client" backup_files "$src" demo | tail -n 1
echo "== backup_files again (unchanged: nothing is read or sent again)"
"$bin/datamover-client" backup_files "$src" demo | tail -n 1
echo "== restore_files $demo/restored demo"
"$bin/datamover-client" restore_files "$demo/restored" demo | tail -n 1
echo "== list"
"$bin/datamover-client" list | tail -n 1

if diff -r --no-dereference "$src" "$demo/restored"; then
  echo "== OK: the restored tree is identical to the original"
else
  echo "== FAILED: the trees differ"; exit 1
fi
