//! Store faults that need the real machine: a full disk (a small tmpfs this test mounts,
//! root only) and a crash (`kill -9` of a child process in the middle of writing).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::pattern;
use strait::block::{BlockId, ChecksumSpec, GenStamp};
use strait::store::{BackendKind, BlockStore, Durability, ReplicaState, StoreConfig, StoreError};

const GS: GenStamp = GenStamp(1);

/// A tmpfs mounted for the duration of a test.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

async fn backends() -> Vec<BackendKind> {
    let mut v = vec![BackendKind::Psync];
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = StoreConfig::new(dir.path());
    cfg.backend = BackendKind::Uring;
    if BlockStore::open(cfg).await.is_ok() {
        v.push(BackendKind::Uring);
    }
    v
}

async fn write_block(store: &BlockStore, block: BlockId, data: &[u8]) -> Result<u64, StoreError> {
    let spec = ChecksumSpec::default();
    let w = store.create(block, GS, spec).await?;
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        w.write(
            (i << 20) as u64,
            piece,
            &spec.checksums(piece),
            Durability::Buffered,
        )
        .await?;
    }
    w.finalize().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_a_clean_error_and_recoverable() {
    for backend in backends().await {
        let fs = match Tmpfs::mount("16m") {
            Ok(fs) => fs,
            Err(why) => {
                eprintln!("skipped disk-full test: {why} (needs root)");
                return;
            }
        };
        let mut cfg = StoreConfig::new(fs.path.join("store"));
        cfg.backend = backend;
        let (store, _) = BlockStore::open(cfg).await.unwrap();
        let a = pattern(1, 3 << 20);
        assert_eq!(write_block(&store, BlockId(1), &a).await.unwrap(), 3 << 20);

        // Fill the disk with block 2.
        let spec = ChecksumSpec::default();
        let w = store.create(BlockId(2), GS, spec).await.unwrap();
        let chunk = pattern(2, 1 << 20);
        let crcs = spec.checksums(&chunk);
        let mut written = 0u64;
        let err = loop {
            match w.write(written, &chunk, &crcs, Durability::Buffered).await {
                Ok(()) => written += 1 << 20,
                Err(e) => break e,
            }
            assert!(
                written < 64 << 20,
                "{backend}: a 16 MiB disk took {written} bytes"
            );
        };
        assert!(
            matches!(err, StoreError::NoSpace { .. }),
            "{backend}: {err}"
        );
        assert!(err.to_string().contains("no space left"), "{err}");
        // Further writes are refused until the writer is reset; finalize is refused too.
        let again = w
            .write(written + (1 << 20), &chunk, &crcs, Durability::Buffered)
            .await
            .unwrap_err();
        assert!(matches!(again, StoreError::WriterFailed { .. }), "{again}");
        assert!(w.finalize().await.is_err());
        drop(w);
        // The partial replica stays in rbw; the other replica is intact.
        assert_eq!(store.get(BlockId(2)).unwrap().state, ReplicaState::Rbw);
        let r = store.reader(BlockId(1), GS).await.unwrap();
        assert_eq!(&r.read(0, 3 << 20).await.unwrap()[..], &a[..]);
        drop(r);

        // Free space: the store works again.
        store.delete(BlockId(1), GS).await.unwrap();
        let c = pattern(3, 1 << 20);
        assert_eq!(
            write_block(&store, BlockId(3), &c).await.unwrap(),
            1 << 20,
            "{backend}"
        );
        let r = store.reader(BlockId(3), GS).await.unwrap();
        assert_eq!(&r.read(0, 1 << 20).await.unwrap()[..], &c[..]);
        drop((r, store));
        // And the rbw replica recovers to a verified prefix after a restart.
        let mut cfg = StoreConfig::new(fs.path.join("store"));
        cfg.backend = backend;
        let (store, report) = BlockStore::open(cfg).await.unwrap();
        let rbw = report
            .recovered_rbw
            .iter()
            .find(|r| r.block == BlockId(2))
            .expect("block 2 recovered");
        assert!(rbw.len <= written + (1 << 20));
        assert_eq!(rbw.len % 4096, 0);
        let r = store.reader(BlockId(2), GS).await.unwrap();
        let got = r.read(0, rbw.len.min(1 << 20) as usize).await.unwrap();
        assert_eq!(&got[..], &chunk[..got.len()]);
    }
}

// ---- crash -------------------------------------------------------------------------------

const CHILD_ENV: &str = "STRAIT_STORE_CRASH_CHILD";

fn block_size(block: u64) -> usize {
    // Sizes from 0 to ~3 MiB, many with a short last chunk.
    ((block * 2_654_435_761) % (3 << 20)) as usize
}

/// Writes replicas forever, printing what each write acknowledged. Run only as the child
/// of `kill_9_mid_write_recovers`.
#[test]
#[ignore = "child process of kill_9_mid_write_recovers; does nothing when run alone"]
fn crash_child() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (store, _) = BlockStore::open(StoreConfig::new(&root)).await.unwrap();
        let spec = ChecksumSpec::default();
        let mut tasks = Vec::new();
        for lane in 0..3u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let block = 1 + lane + 3 * i;
                    let data = pattern(block, block_size(block));
                    let w = store.create(BlockId(block), GS, spec).await.unwrap();
                    let mut off = 0;
                    for piece in data.chunks(64 << 10) {
                        let d = if block % 2 == 0 {
                            Durability::Sync
                        } else {
                            Durability::Buffered
                        };
                        w.write(off as u64, piece, &spec.checksums(piece), d)
                            .await
                            .unwrap();
                        off += piece.len();
                        println!("ACK {block} {off}");
                    }
                    let len = w.finalize().await.unwrap();
                    println!("FIN {block} {len}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_write_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut finalized: HashMap<u64, u64> = HashMap::new();
    let mut record = |line: &str| {
        // The test harness may print its own text on the same line before ours.
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = tokens.iter().position(|t| *t == "ACK" || *t == "FIN") else {
            return;
        };
        let (Some(b), Some(n)) = (tokens.get(i + 1), tokens.get(i + 2)) else {
            return;
        };
        let (Ok(b), Ok(n)) = (b.parse::<u64>(), n.parse::<u64>()) else {
            return;
        };
        if tokens[i] == "ACK" {
            acked.insert(b, n);
        } else {
            finalized.insert(b, n);
        }
    };
    // Let it finalize a dozen replicas and get well into the next ones, then kill it
    // right after an ACK of a block not yet finalized (so one is surely mid-write).
    let mut lines = 0;
    let mut fin_lines = 0;
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("child makes progress");
        lines += 1;
        fin_lines += usize::from(line.contains("FIN "));
        record(&line);
        if fin_lines >= 12 && lines >= 200 && line.contains("ACK ") {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Whatever the child printed before dying counts as acknowledged too.
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        record(&line);
    }
    assert!(
        acked.len() > finalized.len(),
        "some replicas were mid-write at the kill"
    );

    let (store, report) = BlockStore::open(StoreConfig::new(dir.path()))
        .await
        .unwrap();
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert!(
        !report.recovered_rbw.is_empty(),
        "replicas being written at the kill come back as rbw"
    );
    check_after_crash(&store, &acked, &finalized).await;
}

async fn check_after_crash(
    store: &BlockStore,
    acked: &HashMap<u64, u64>,
    finalized: &HashMap<u64, u64>,
) {
    for info in store.list() {
        let b = info.block.0;
        let expect = pattern(b, block_size(b));
        match info.state {
            ReplicaState::Finalized => assert_eq!(
                info.len,
                expect.len() as u64,
                "finalized {b} has its full length"
            ),
            ReplicaState::Rbw => {
                assert!(
                    !finalized.contains_key(&b),
                    "block {b} was finalized but recovered as rbw"
                );
                let acked_len = acked.get(&b).copied().unwrap_or(0);
                assert!(
                    info.len >= acked_len,
                    "rbw {b}: recovered {} < acked {acked_len}",
                    info.len
                );
            }
            ReplicaState::Corrupt => panic!("block {b} quarantined"),
        }
        let r = store.reader(info.block, GS).await.unwrap();
        let mut off = 0u64;
        while off < info.len {
            let n = (info.len - off).min(1 << 20) as usize;
            let got = r.read(off, n).await.unwrap();
            assert_eq!(
                &got[..],
                &expect[off as usize..off as usize + n],
                "block {b} at {off}"
            );
            off += n as u64;
        }
    }
    for (&b, &len) in finalized {
        let info = store
            .get(BlockId(b))
            .unwrap_or_else(|| panic!("finalized block {b} lost"));
        assert_eq!((info.state, info.len), (ReplicaState::Finalized, len));
    }
    for &b in acked.keys() {
        assert!(store.get(BlockId(b)).is_some(), "acked block {b} lost");
    }
}
