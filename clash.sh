#!/bin/bash
# test wrapper: on the first 'server' start, point one listener at a held port
if [ "$3" = server ] && [ ! -e /tmp/garage-check/clash.done ]; then
  touch /tmp/garage-check/clash.done
  if [ "$CLASH" = s3 ]; then
    sed -i "s/^api_bind_addr = .*/api_bind_addr = \"127.0.0.1:\"/" "$2"
  else
    sed -i "s/^rpc_bind_addr = .*/rpc_bind_addr = \"127.0.0.1:\"/" "$2"
  fi
fi
exec /root/.cargo/bin/garage "$@"
