"""A Zenoh client that knows nothing of shmcast: it decodes frames from the documented
wire format (docs/ZENOH.md) with zenoh, msgpack and numpy alone.

Run as ``python -S tests/_plain_zenoh.py SITE CONNECT KEYEXPR COUNT [TLS_DIR]``:
``-S`` skips site-packages' .pth files, so the editable shmcast install is not
on the path; only the plain directory SITE (the site-packages holding the three
libraries) is added.
Prints ``READY {}``, then ``RESULT {json}`` with what it decoded.
"""

import ast
import json
import sys
import time

sys.path.append(sys.argv.pop(1))

import importlib.util

import msgpack
import numpy as np
import zenoh


def main(connect: str, keyexpr: str, count: str, tls_dir: str = "") -> int:
    assert importlib.util.find_spec("shmcast") is None, "shmcast must not be importable here"
    conf = {
        "mode": "client",
        "connect": {"endpoints": [connect]},
        "scouting": {"multicast": {"enabled": False}, "gossip": {"enabled": False}},
        "transport": {"shared_memory": {"enabled": False}},
    }
    if tls_dir:
        conf["transport"]["link"] = {
            "tls": {
                "root_ca_certificate": f"{tls_dir}/ca.pem",
                "connect_certificate": f"{tls_dir}/client.pem",
                "connect_private_key": f"{tls_dir}/client.key",
                "enable_mtls": True,
            }
        }
    session = zenoh.open(zenoh.Config.from_json5(json.dumps(conf)))
    sub = session.declare_subscriber(keyexpr)
    decoded = []
    try:
        print("READY {}", flush=True)
        deadline = time.monotonic() + 60
        while len(decoded) < int(count) and time.monotonic() < deadline:
            sample = sub.try_recv()
            if sample is None:
                time.sleep(0.001)
                continue
            # docs/ZENOH.md's recipe, as a client without shmcast writes it
            meta = msgpack.unpackb(sample.attachment.to_bytes())
            spec = meta["dtype"]
            descr = ast.literal_eval(spec) if spec.startswith("[") else spec
            dtype = np.lib.format.descr_to_dtype(descr)
            array = np.frombuffer(sample.payload.to_bytes(), dtype=dtype)
            array = array.reshape(meta["shape"])
            decoded.append(
                {
                    "key": str(sample.key_expr),
                    "version": meta["version"],
                    "dtype": meta["dtype"],
                    "shape": meta["shape"],
                    "whole": bool((array == meta["version"]).all()),
                }
            )
    finally:
        sub.undeclare()
        session.close()
    print("RESULT " + json.dumps(decoded), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
