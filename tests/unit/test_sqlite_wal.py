"""freehold.sqlite_wal: several threads opening the same new SQLite file at once all get a WAL connection and can
write. (Without the retry, SQLite can answer "database is locked" to such an opener without waiting: it happened
once in CI; it is rare, so this test guards the helper's behaviour rather than reproducing that race.)"""
import sqlite3
import threading

import pytest

from freehold.sqlite_wal import connect_wal, transaction


def test_threads_opening_one_new_file_at_once_all_get_wal(tmp_path):
    for round_ in range(20):
        path = tmp_path / f"round{round_}.sqlite"
        start, modes, errors = threading.Barrier(6), [], []

        def open_it():
            start.wait()
            try:
                conn = connect_wal(path)
                modes.append(conn.execute("PRAGMA journal_mode").fetchone()[0])
                conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
                conn.execute("INSERT INTO t VALUES (1)")
                conn.close()
            except sqlite3.Error as exc:  # pragma: no cover - the failure this test exists to catch
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and modes == ["wal"] * 6
        assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM t").fetchone()[0] == 6


def test_a_connection_is_usable_from_another_thread_with_full_sync(tmp_path):
    conn = connect_wal(tmp_path / "x.sqlite")
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    result = []
    worker = threading.Thread(target=lambda: result.append(conn.execute("SELECT 1").fetchone()[0]))
    worker.start()
    worker.join()
    assert result == [1]


def test_a_transaction_commits_or_rolls_back_whole(tmp_path):
    conn = connect_wal(tmp_path / "t.sqlite")
    conn.execute("CREATE TABLE t (x UNIQUE)")
    with transaction(conn):
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("INSERT INTO t VALUES (2)")
    with pytest.raises(sqlite3.IntegrityError):
        with transaction(conn):
            conn.execute("INSERT INTO t VALUES (3)")
            conn.execute("INSERT INTO t VALUES (1)")  # fails: 3 goes with it
    assert not conn.in_transaction
    assert [r[0] for r in conn.execute("SELECT x FROM t ORDER BY x")] == [1, 2]


def test_a_failed_commit_is_rolled_back_and_the_connection_stays_usable(tmp_path):
    conn = connect_wal(tmp_path / "fk.sqlite")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TABLE child (p REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        with transaction(conn):
            conn.execute("INSERT INTO child VALUES (7)")  # checked at COMMIT, which fails
    assert not conn.in_transaction
    with transaction(conn):
        conn.execute("INSERT INTO parent VALUES (7)")
        conn.execute("INSERT INTO child VALUES (7)")
    assert conn.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 1
