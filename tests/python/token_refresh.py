"""redis-py with credential providers that hand out short-lived access tokens, through slotgate.

Usage: token_refresh.py PORT OID TOKENS_JSON

TOKENS_JSON is a list of {"token": ..., "exp": unix seconds}, made by the Rust test with
increasing expiry. A provider hands out the earliest token still valid for a while, so
every token it gives expires during the run.

1. A plain CredentialProvider: slotgate closes each connection when its token expires;
   redis-py notices the closed connection and reconnects with a fresh token. Every command
   succeeds, and the connection is replaced at least once.
2. A StreamingCredentialProvider (how redis-py's Entra ID support works): fresh tokens are
   pushed to the client, which re-AUTHs its live connection. Every command succeeds on the
   same connection, past the expiry of the token it connected with.
"""

import json
import sys
import threading
import time

import redis
from redis.auth.token import SimpleToken
from redis.credentials import CredentialProvider, StreamingCredentialProvider

port, oid, tokens_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(tokens_path) as f:
    TOKENS = json.load(f)


def fresh(margin=1.2):
    """The earliest token valid for at least `margin` seconds more."""
    now = time.time()
    for t in TOKENS:
        if t["exp"] - now >= margin:
            return t
    raise RuntimeError("the test ran out of tokens")


class Provider(CredentialProvider):
    def __init__(self):
        self.calls = 0

    def get_credentials(self):
        self.calls += 1
        return oid, fresh()["token"]


class Streaming(StreamingCredentialProvider):
    def __init__(self):
        self.callbacks = []
        self.stop = threading.Event()
        self.pushed = 0

    def get_credentials(self):
        return oid, fresh()["token"]

    def on_next(self, callback):
        self.callbacks.append(callback)

    def on_error(self, callback):
        pass

    def is_streaming(self):
        return True

    def run(self):
        while not self.stop.wait(0.4):
            t = fresh()
            token = SimpleToken(t["token"], t["exp"] * 1000, time.time() * 1000, {"oid": oid})
            for cb in self.callbacks:
                cb(token)
            self.pushed += 1


def exercise(r, seconds, tag):
    """Commands for `seconds`; the distinct connection ids they ran on."""
    ids = set()
    end = time.time() + seconds
    i = 0
    while time.time() < end:
        key = f"tok:{tag}:{i}"
        assert r.set(key, i) is True
        assert r.get(key) == str(i).encode()
        ids.add(r.client_id())
        i += 1
        time.sleep(0.05)
    return ids, i


# 1. Expiry closes the connection; the client reconnects with a new token.
provider = Provider()
r = redis.Redis(port=port, credential_provider=provider)
first_exp = fresh()["exp"]
ids, n = exercise(r, first_exp - time.time() + 2.5, "plain")
assert len(ids) >= 2, f"the connection was never replaced: {ids}"
assert provider.calls >= 2, provider.calls
r.close()
print(f"plain provider: {n} commands over {len(ids)} connections")

# 2. Re-AUTH on the live connection keeps it open past the first token's expiry.
streaming = Streaming()
r = redis.Redis(port=port, credential_provider=streaming)
assert r.ping()
first_exp = fresh()["exp"]
pusher = threading.Thread(target=streaming.run, daemon=True)
pusher.start()
ids, n = exercise(r, first_exp - time.time() + 2.5, "streaming")
streaming.stop.set()
pusher.join()
assert len(ids) == 1, f"the connection was replaced instead of re-authenticated: {ids}"
assert streaming.pushed >= 3, streaming.pushed
print(f"streaming provider: {n} commands on one connection, {streaming.pushed} re-AUTHs")
print("token refresh OK")
