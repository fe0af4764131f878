"""data_pipeline.storage against local paths and a real S3 server (moto_server over HTTP, tests/s3_server.py)."""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid

import numpy as np
import pytest

from data_pipeline import storage


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_prefix")


def test_round_trips(base):
    rng = np.random.default_rng()
    blob = rng.bytes(int(rng.integers(1, 200_000)))
    storage.write_bytes(storage.join(base, "d", "blob.bin"), blob)
    assert storage.read_bytes(storage.join(base, "d", "blob.bin")) == blob
    assert storage.size(storage.join(base, "d", "blob.bin")) == len(blob)
    assert storage.exists(storage.join(base, "d", "blob.bin")) and storage.isdir(storage.join(base, "d"))
    with storage.open_file(storage.join(base, "d", "blob.bin")) as f:
        assert f.read(100) == blob[:100]
    obj = {"name": "ü€", "n": int(rng.integers(1 << 40)), "xs": rng.random(5).tolist()}
    storage.write_json(storage.join(base, "x.json"), obj)
    assert storage.read_json(storage.join(base, "x.json")) == obj
    arr = rng.integers(-1000, 1000, size=(7, int(rng.integers(1, 50)))).astype(np.int32)
    storage.save_array(storage.join(base, "a.npy"), arr)
    got = storage.load_array(storage.join(base, "a.npy"))
    assert got.dtype == arr.dtype and np.array_equal(got, arr)
    storage.remove(storage.join(base, "d"))
    assert not storage.exists(storage.join(base, "d", "blob.bin"))
    storage.remove(storage.join(base, "never-was"))  # missing is fine


def test_listing_and_globs(base):
    names = ["a/x.jsonl", "a/b/y.jsonl", "a/b/z.txt", "c.jsonl"]
    for n in names:
        storage.write_bytes(storage.join(base, *n.split("/")), n.encode())
    want = sorted(storage.join(base, *n.split("/")) for n in names)
    assert storage.list_files(base) == want
    assert storage.list_files(storage.join(base, "a")) == [w for w in want if "/a/" in w]
    assert storage.list_files(storage.join(base, "a", "*.jsonl")) == [storage.join(base, "a", "x.jsonl")]
    assert storage.list_files(base + "/**/*.jsonl") == [w for w in want if w.endswith(".jsonl")]
    assert storage.list_files(storage.join(base, "c.jsonl")) == [storage.join(base, "c.jsonl")]
    assert storage.list_files(storage.join(base, "nothing-here")) == []
    for f in storage.list_files(base):  # listed URLs are readable as they are
        assert storage.read_bytes(f).decode() in names


def test_atomic_writes_never_show_half_a_file(base):
    """A reader racing a writer sees one whole version or the other, never a mix or a truncation."""
    url = storage.join(base, "atomic.bin")
    versions = [bytes([v]) * (1 << 18) for v in range(1, 4)]
    storage.write_bytes(url, versions[0])
    stop, seen, bad = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            data = storage.read_bytes(url)
            (seen.add(data[0]) if data in versions else bad.append(len(data)))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for k in range(12):
            storage.write_bytes(url, versions[k % 3])
    finally:
        stop.set()
        t.join()
    assert not bad, f"partial reads of sizes {bad[:5]}"
    assert seen
    if not storage.is_remote(base):  # no temporary file left beside it
        assert sorted(os.listdir(os.path.dirname(url))) == ["atomic.bin"]


def test_download_and_copy_tree(base, tmp_path):
    rng = np.random.default_rng()
    files = {f"t/{i}/f{i}.bin": rng.bytes(int(rng.integers(1, 5000))) for i in range(4)}
    src = tmp_path / "src"
    for rel, data in files.items():
        storage.write_bytes(str(src / rel), data)
    assert storage.copy_tree(str(src), storage.join(base, "tree")) == len(files)
    back = tmp_path / "back"
    assert storage.copy_tree(storage.join(base, "tree"), str(back)) == len(files)
    for rel, data in files.items():
        assert (back / rel).read_bytes() == data
    dest = tmp_path / "dl" / "one.bin"
    assert storage.download_file(storage.join(base, "tree", "t/0/f0.bin"), dest) == len(files["t/0/f0.bin"])
    with pytest.raises(storage.ObjectNotFound, match="missing.bin"):
        storage.download_file(storage.join(base, "tree", "missing.bin"), tmp_path / "dl" / "missing.bin")
    assert sorted(os.listdir(tmp_path / "dl")) == ["one.bin"]  # a failed download leaves nothing


def test_missing_and_corrupt_fail_naming_the_url(base):
    missing = storage.join(base, "no", "such.json")
    for fn in (storage.read_bytes, storage.read_json, storage.size, storage.load_array):
        with pytest.raises(storage.ObjectNotFound, match=r"no/such\.json: not found"):
            fn(missing)
    bad = storage.join(base, "bad.json")
    storage.write_bytes(bad, b'{"truncated": ')
    with pytest.raises(storage.StorageError, match=r"bad\.json: corrupt JSON.*rerun"):
        storage.read_json(bad)
    npy = storage.join(base, "bad.npy")
    storage.write_bytes(npy, b"\x93NUMPY garbage")
    with pytest.raises(storage.StorageError, match=r"bad\.npy: corrupt \.npy"):
        storage.load_array(npy)


def test_missing_bucket_names_it(s3_server):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x.json"
    with pytest.raises(storage.ObjectNotFound, match=url.replace(".", r"\.") + ": not found"):
        storage.read_json(url)


def test_access_denied_names_url_and_fix(s3_server):
    """A server that checks credentials (moto with auth on) refuses the dummy ones: AccessDenied names the URL and
    what to change, for reads, writes and listings; the manifest reader passes it on."""
    from s3_server import local_s3_server

    from data_pipeline.manifest import ManifestError, read_manifest

    with local_s3_server(enforce_auth=True) as strict:
        url = f"{strict.url}/ds"
        for op, fn in (
            ("read", lambda: storage.read_bytes(url + "/x.bin")),
            ("write", lambda: storage.write_bytes(url + "/x.bin", b"1")),
            ("list", lambda: storage.list_files(url)),
        ):
            with pytest.raises(storage.AccessDenied, match=rf"{url}.*: access denied \({op}\).*AWS_ACCESS_KEY_ID"):
                fn()
        with pytest.raises(ManifestError, match=f"{url}/manifest.json: access denied"):
            read_manifest(url)
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint  # the session server's settings are back


def test_unreachable_endpoint_and_credentials_never_shown(s3_server, monkeypatch, caplog):
    """A dead endpoint fails fast (AWS_MAX_ATTEMPTS=1) naming the URL and the variable to fix; nothing this
    module logs or raises contains the secret key (or the access key id) in use."""
    from parallel.process_groups import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    url = f"{s3_server.url}/a.json"
    messages = []
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(storage.EndpointUnreachable, match="AWS_ENDPOINT_URL") as err:
            storage.read_json(url)
        messages.append(str(err.value))
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
        with pytest.raises(storage.ObjectNotFound) as err:
            storage.read_bytes(f"{s3_server.url}/nope-{uuid.uuid4().hex}")
        messages.append(str(err.value))
    assert url in messages[0] and dead in messages[0]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    assert all(s3_server.secret not in m and key_id not in m for m in messages)
    assert s3_server.secret not in caplog.text  # no logger at all, botocore's included, printed the secret
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("data_pipeline"))
    assert key_id not in ours


def test_retry_policy(monkeypatch, caplog):
    """Transient errors are retried with backoff, permanent ones are not; the last error names the URL."""
    monkeypatch.setattr(storage, "OP_BACKOFF_S", 0.001)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < storage.OP_ATTEMPTS:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="data_pipeline.storage"):
        assert storage.retrying("read", "s3://b/k", flaky) == "ok"
    assert len(calls) == storage.OP_ATTEMPTS and caplog.text.count("transient error") == storage.OP_ATTEMPTS - 1
    calls.clear()

    def always_slow():
        calls.append(1)
        raise OSError(5, "An error occurred (SlowDown) when calling GetObject: please reduce your request rate")

    with pytest.raises(storage.StorageError, match="s3://b/k2: read failed.*SlowDown"):
        storage.retrying("read", "s3://b/k2", always_slow)
    assert len(calls) == storage.OP_ATTEMPTS
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("b/k3")

    with pytest.raises(storage.ObjectNotFound, match="s3://b/k3: not found"):
        storage.retrying("read", "s3://b/k3", missing)
    assert len(calls) == 1

    def denied():
        raise PermissionError("Access Denied")

    with pytest.raises(storage.AccessDenied, match="s3://b/k4: access denied.*AWS_ACCESS_KEY_ID"):
        storage.retrying("read", "s3://b/k4", denied)


def test_urls_and_redaction():
    assert storage.join("s3://b/p/", "x", "/y/") == "s3://b/p/x/y"
    assert storage.dirname("s3://b/p/manifest.json") == "s3://b/p" and storage.basename("s3://b/p/m.json") == "m.json"
    assert storage.redact("http://user:pa55@host:9000/x") == "http://host:9000/x"
    assert storage.redact("s3://bucket/key") == "s3://bucket/key"
    assert json.loads(json.dumps(storage.join("/tmp", "a"))) == os.path.join("/tmp", "a")
