//! [`ReplicaWriter`]: appends to one `rbw` replica, truncation and genstamp bumps during
//! recovery, and finalize.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Notify, RwLock};

use super::aligned::{self, round_up};
use super::layout::Files;
use super::{BlockStore, Durability, MAX_IO, ReplicaState, StoreError, blocking, io_err, meta};
use crate::block::{BlockId, ChecksumSpec, GenStamp, MAX_BLOCK_SIZE};

struct WriterState {
    /// End of the bytes reserved by writes so far (the replica's length once they land).
    len: u64,
    /// End of the longest prefix whose writes have all landed: what readers may see.
    landed: u64,
    /// Writes that landed beyond `landed` (start -> end), waiting for the gap before them.
    ahead: BTreeMap<u64, u64>,
    /// Tickets of writes issued and not yet landed (tickets number writes in issue order).
    in_flight: BTreeSet<u64>,
    next_ticket: u64,
    failed: Option<String>,
    genstamp: GenStamp,
    finalized: bool,
}

impl WriterState {
    /// Records that the write `[offset, end)` landed; returns the new landed length.
    fn land(&mut self, offset: u64, end: u64) -> u64 {
        self.ahead
            .entry(offset)
            .and_modify(|e| *e = (*e).max(end))
            .or_insert(end);
        // Writes at or before the landed end extend it (a rewrite of the partial last
        // chunk starts before it); the rest wait for their gap to fill.
        while let Some((&start, &stop)) = self.ahead.first_key_value() {
            if start > self.landed {
                break;
            }
            self.ahead.pop_first();
            self.landed = self.landed.max(stop);
        }
        self.landed
    }
}

/// A write's place among the writes of its replica.
#[derive(Debug, Clone, Copy)]
struct Reservation {
    /// It changes the replica's tail (a short last chunk, a rewrite): it runs alone.
    exclusive: bool,
    ticket: u64,
}

/// Writes one `rbw` replica. Appends may run concurrently (each reserves its range
/// first); a write that ends in a short chunk, a rewrite of the last partial chunk and a
/// truncate run alone. Dropping the writer leaves the replica in `rbw`.
///
/// A new replica's files are created by whatever first needs them: a replica finalized
/// before anything else touched its files (a small block written in one call to
/// [`ReservedWrite::write_and_finalize`], or an empty one) is created, written, sealed,
/// committed and moved by the store's committer in one hand-off.
pub struct ReplicaWriter {
    store: BlockStore,
    block: BlockId,
    spec: ChecksumSpec,
    /// Set once the files exist (from the start for a reopened replica). Set only under
    /// the `tail` lock, so a finalize that finds it empty creates them itself.
    files: tokio::sync::OnceCell<Files>,
    state: Mutex<WriterState>,
    /// Appends of whole chunks share it; anything that changes the tail takes it alone.
    tail: RwLock<()>,
    /// Signalled whenever a write lands (or fails).
    landed: Notify,
}

impl std::fmt::Debug for ReplicaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaWriter")
            .field("block", &self.block)
            .field("genstamp", &self.genstamp())
            .field("len", &self.len())
            .finish()
    }
}

impl ReplicaWriter {
    pub(super) fn new(
        store: BlockStore,
        block: BlockId,
        genstamp: GenStamp,
        spec: ChecksumSpec,
        files: Option<Files>,
        len: u64,
    ) -> Self {
        ReplicaWriter {
            store,
            block,
            spec,
            files: tokio::sync::OnceCell::new_with(files),
            state: Mutex::new(WriterState {
                len,
                landed: len,
                ahead: BTreeMap::new(),
                in_flight: BTreeSet::new(),
                next_ticket: 0,
                failed: None,
                genstamp,
                finalized: false,
            }),
            tail: RwLock::new(()),
            landed: Notify::new(),
        }
    }

    /// The replica's files, created (with an unsealed header) if they do not exist yet.
    /// Callers hold the `tail` lock. A finalized replica's files are in `finalized` (the
    /// committer may have made them without setting them here): none are made for it.
    async fn files(&self) -> Result<&Files, StoreError> {
        if self.files.get().is_none() && self.state().finalized {
            return Err(StoreError::WrongState {
                block: self.block,
                state: ReplicaState::Finalized,
                needed: ReplicaState::Rbw,
            });
        }
        self.files
            .get_or_try_init(|| {
                self.store
                    .create_files(self.block, self.genstamp(), self.spec)
            })
            .await
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The block.
    pub fn block(&self) -> BlockId {
        self.block
    }

    /// The replica's current generation stamp.
    pub fn genstamp(&self) -> GenStamp {
        self.state().genstamp
    }

    /// The checksum spec of the replica.
    pub fn spec(&self) -> ChecksumSpec {
        self.spec
    }

    /// Bytes written (reserved by writes issued so far).
    pub fn len(&self) -> u64 {
        self.state().len
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn invalid(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Invalid {
            block: self.block,
            reason: reason.into(),
        }
    }

    /// Writes `data` at `offset`, with one checksum per chunk in `crcs`. `offset` must be
    /// the replica's current length (append) or, when the replica ends in a partial
    /// chunk, that chunk's start (rewrite it longer). Only the last chunk of `data` may be
    /// short, and then it ends the replica. The data is verified against `crcs` first.
    ///
    /// The checks and the reservation of the range happen when `write` is called, not
    /// when the returned future is first polled: appends issued back to back are ordered
    /// by their calls and may then complete in any order. Readers see a range once it and
    /// everything before it have landed.
    ///
    /// With [`Durability::Sync`] (`data` may be empty), the call returns once this write
    /// and every write issued before it have landed and all of them, with the replica's
    /// meta and its directory entry, are durable.
    pub fn write<'a>(
        &'a self,
        offset: u64,
        data: &'a [u8],
        crcs: &'a [u32],
        durability: Durability,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'a {
        let reserved = self.issue(offset, data, crcs);
        async move {
            let (r, limit) = reserved?;
            self.run_reserved(r, limit, offset, data, crcs, durability)
                .await
        }
    }

    /// [`write`](Self::write) with owned buffers, checked now: validation (checksums
    /// included) and the reservation of the range happen in this call, and a refusal is
    /// returned at once; the IO runs in the returned future, which borrows nothing and
    /// can be spawned.
    pub fn try_write_owned(
        self: &Arc<Self>,
        offset: u64,
        data: Bytes,
        crcs: Vec<u32>,
        durability: Durability,
    ) -> Result<
        impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static,
        StoreError,
    > {
        Ok(self.reserve_owned(offset, data, crcs)?.write(durability))
    }

    /// Checks and reserves a write as [`write`](Self::write) does, without running it:
    /// the returned [`ReservedWrite`] runs it later, either as a plain write or as the
    /// replica's last write together with its finalize.
    pub fn reserve_owned(
        self: &Arc<Self>,
        offset: u64,
        data: Bytes,
        crcs: Vec<u32>,
    ) -> Result<ReservedWrite, StoreError> {
        let (reservation, limit) = self.issue(offset, &data, &crcs)?;
        Ok(ReservedWrite {
            writer: self.clone(),
            parts: Some(Parts {
                reservation,
                limit,
                offset,
                data,
                crcs,
            }),
        })
    }

    /// Runs a reserved write (see [`ReservedWrite::write`]).
    async fn run_parts(&self, p: Parts, durability: Durability) -> Result<(), StoreError> {
        self.run_reserved(
            p.reservation,
            p.limit,
            p.offset,
            &p.data,
            &p.crcs,
            durability,
        )
        .await
    }

    /// Runs the write reserved as `r` (none for empty data); with [`Durability::Sync`],
    /// then waits until every write below `limit` has landed and is durable.
    async fn run_reserved(
        &self,
        r: Option<Reservation>,
        limit: u64,
        offset: u64,
        data: &[u8],
        crcs: &[u32],
        durability: Durability,
    ) -> Result<(), StoreError> {
        if let Some(r) = r {
            self.run_write(r, offset, data, crcs).await?;
        }
        if durability == Durability::Sync {
            self.make_durable(limit).await?;
        }
        Ok(())
    }

    /// Ends a reservation whose write never ran: its range never lands, so the writer
    /// fails (a recovery's [`truncate_to`](Self::truncate_to) clears that), and whoever
    /// waits for its ticket is let go.
    fn abandon(&self, p: Parts) {
        if let Some(r) = p.reservation {
            drop(self.ticket(r, p.offset, &p.data));
        }
    }

    /// The ticket of a reserved write about to run.
    fn ticket(&self, r: Reservation, offset: u64, data: &[u8]) -> Ticket<'_> {
        Ticket {
            writer: self,
            ticket: r.ticket,
            offset,
            end: offset + data.len() as u64,
            open: true,
        }
    }

    /// Reserves a write (none for empty data) and says which writes a sync after it must
    /// wait for: every ticket below the returned limit.
    fn issue(
        &self,
        offset: u64,
        data: &[u8],
        crcs: &[u32],
    ) -> Result<(Option<Reservation>, u64), StoreError> {
        if data.is_empty() {
            return Ok((None, self.state().next_ticket));
        }
        let r = self.reserve(offset, data, crcs)?;
        Ok((Some(r), r.ticket + 1))
    }

    async fn run_write(
        &self,
        r: Reservation,
        offset: u64,
        data: &[u8],
        crcs: &[u32],
    ) -> Result<(), StoreError> {
        let ticket = self.ticket(r, offset, data);
        // A write that changes the tail waits for the appends before it to land.
        let _guard = if r.exclusive {
            Guard::Write(self.tail.write().await)
        } else {
            Guard::Read(self.tail.read().await)
        };
        let short_end = !(data.len() as u64).is_multiple_of(u64::from(self.spec.bytes_per_chunk()));
        let result = self
            .do_write(offset, data, crcs, short_end, r.exclusive)
            .await;
        ticket.settle(&result);
        result
    }

    /// Records the outcome of the write with `ticket` over `[offset, end)`: landed, or
    /// the writer failed; wakes whoever waits for writes to land.
    fn settle<T>(&self, ticket: u64, offset: u64, end: u64, result: &Result<T, StoreError>) {
        {
            let mut st = self.state();
            st.in_flight.remove(&ticket);
            match result {
                Ok(_) => {
                    let landed = st.land(offset, end);
                    if let Some(e) = self.store.index().get_mut(&self.block) {
                        e.len = landed;
                    }
                }
                Err(e) => {
                    st.failed.get_or_insert_with(|| e.to_string());
                }
            }
        }
        self.landed.notify_waiters();
    }

    /// Waits until every write with a ticket below `limit` has landed, then makes the
    /// replica durable (data, meta, directory entry) through the store's group commit.
    async fn make_durable(&self, limit: u64) -> Result<(), StoreError> {
        self.wait_landed(limit).await?;
        // A sync before any write makes the (empty) replica's files durable.
        let data = {
            let _guard = self.tail.read().await;
            self.files().await?.data.clone()
        };
        self.store
            .inner
            .committer
            .commit()
            .await
            .map_err(|e| io_err("fsync", &data.path, e))
    }

    /// Waits until every write with a ticket below `limit` has landed; an error if one of
    /// them failed.
    async fn wait_landed(&self, limit: u64) -> Result<(), StoreError> {
        loop {
            let notified = self.landed.notified();
            {
                let st = self.state();
                if let Some(reason) = &st.failed {
                    return Err(StoreError::WriterFailed {
                        block: self.block,
                        reason: reason.clone(),
                    });
                }
                if st.in_flight.range(..limit).next().is_none() {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Validates a write and reserves its range and its ticket.
    fn reserve(&self, offset: u64, data: &[u8], crcs: &[u32]) -> Result<Reservation, StoreError> {
        let bpc = u64::from(self.spec.bytes_per_chunk());
        let n = data.len() as u64;
        if data.len() > MAX_IO {
            return Err(self.invalid(format!(
                "write of {n} bytes exceeds the {MAX_IO}-byte limit"
            )));
        }
        if !offset.is_multiple_of(bpc) {
            return Err(self.invalid(format!(
                "offset {offset} is not a multiple of the {bpc}-byte chunk"
            )));
        }
        if offset + n > MAX_BLOCK_SIZE {
            return Err(self.invalid(format!(
                "write ends at {} beyond the maximum block size {MAX_BLOCK_SIZE}",
                offset + n
            )));
        }
        if crcs.len() as u64 != self.spec.chunks_for(n) {
            return Err(self.invalid(format!(
                "{} checksums for {} chunks",
                crcs.len(),
                self.spec.chunks_for(n)
            )));
        }
        self.spec
            .verify(offset / bpc, data, crcs)
            .map_err(|m| StoreError::DataChecksum {
                block: self.block,
                chunk: m.chunk,
                offset: m.offset,
            })?;
        let mut st = self.state();
        if st.finalized {
            return Err(StoreError::WrongState {
                block: self.block,
                state: ReplicaState::Finalized,
                needed: ReplicaState::Rbw,
            });
        }
        if let Some(reason) = &st.failed {
            return Err(StoreError::WriterFailed {
                block: self.block,
                reason: reason.clone(),
            });
        }
        let partial_start = st.len - st.len % bpc;
        let rewrite = !st.len.is_multiple_of(bpc) && offset == partial_start;
        if offset != st.len && !rewrite {
            return Err(self.invalid(format!("write at {offset}, replica length is {}", st.len)));
        }
        if rewrite && offset + n < st.len {
            return Err(self.invalid("rewrite of the last chunk must not shorten it"));
        }
        st.len = offset + n;
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.in_flight.insert(ticket);
        Ok(Reservation {
            exclusive: rewrite || !n.is_multiple_of(bpc),
            ticket,
        })
    }

    /// Writes data and checksums. `ordered`: the write changes the replica's tail (its
    /// last chunk rewritten or cut short), so the data lands (and is cut to length)
    /// before the checksum changes: a crash in between leaves the old checksum over an
    /// unchanged prefix of the chunk, which recovery keeps.
    async fn do_write(
        &self,
        offset: u64,
        data: &[u8],
        crcs: &[u32],
        short_end: bool,
        ordered: bool,
    ) -> Result<(), StoreError> {
        let engine = &self.store.inner.engine;
        let Files {
            data: dfile,
            meta: mfile,
        } = self.files().await?;
        let (dbuf, mbuf, meta_at, direct) = self.buffers(offset, data, crcs);
        let end = offset + data.len() as u64;
        let cut = async {
            if short_end && direct {
                // The padded tail went to disk; cut the file to the true length.
                let data = dfile.clone();
                blocking(move || {
                    data.file
                        .set_len(end)
                        .map_err(|e| io_err("truncate", &data.path, e))
                })
                .await?;
            }
            Ok::<(), StoreError>(())
        };
        if ordered {
            engine
                .write_at(dfile, offset, dbuf)
                .await
                .0
                .map_err(|e| io_err("write", &dfile.path, e))?;
            cut.await?;
            engine
                .write_at(mfile, meta_at, mbuf)
                .await
                .0
                .map_err(|e| io_err("write", &mfile.path, e))?;
        } else {
            let (dres, mres) = tokio::join!(
                engine.write_at(dfile, offset, dbuf),
                engine.write_at(mfile, meta_at, mbuf),
            );
            dres.0.map_err(|e| io_err("write", &dfile.path, e))?;
            mres.0.map_err(|e| io_err("write", &mfile.path, e))?;
            cut.await?;
        }
        Ok(())
    }

    /// The buffers of a write: the data (padded to the alignment when the data file is
    /// O_DIRECT), its checksums, where they go in the meta file, and whether the data
    /// file is O_DIRECT.
    fn buffers(
        &self,
        offset: u64,
        data: &[u8],
        crcs: &[u32],
    ) -> (aligned::AlignedBuf, aligned::AlignedBuf, u64, bool) {
        let inner = &self.store.inner;
        let direct = inner.uses_direct(self.spec);
        let mut dbuf = inner.pool.get_at_least(round_up(data.len()));
        if direct {
            dbuf.fill_padded(data);
        } else {
            dbuf.set_len(data.len());
            dbuf.copy_from_slice(data);
        }
        let mut mbuf = aligned::AlignedBuf::new(crcs.len() * 4);
        mbuf.set_len(crcs.len() * 4);
        meta::encode_crcs(crcs, &mut mbuf);
        let first_chunk = offset / u64::from(self.spec.bytes_per_chunk());
        (dbuf, mbuf, meta::crc_offset(first_chunk), direct)
    }

    /// Cuts the replica to `len` bytes (pipeline recovery agreeing on the acked length)
    /// and clears an earlier write failure. `len` must not exceed the current length.
    pub async fn truncate_to(&self, len: u64) -> Result<(), StoreError> {
        let _guard = self.tail.write().await;
        let cur = self.state().len;
        if len > cur {
            return Err(self.invalid(format!("truncate to {len} beyond length {cur}")));
        }
        let chunks = self.spec.chunks_for(len);
        let (spec, block) = (self.spec, self.block);
        let Files { data, meta } = self.files().await?.clone();
        blocking(move || {
            data.file
                .set_len(len)
                .map_err(|e| io_err("truncate", &data.path, e))?;
            // Cut inside a chunk (a resume at an hflushed length): that chunk's checksum
            // now covers only the bytes kept.
            let bpc = u64::from(spec.bytes_per_chunk());
            if !len.is_multiple_of(bpc) {
                let start = len / bpc * bpc;
                let mut buf = aligned::AlignedBuf::new(bpc as usize);
                buf.set_len(bpc as usize);
                let n = read_full_at(&data.file, &mut buf, start)
                    .map_err(|e| io_err("read", &data.path, e))?;
                let kept = (len - start) as usize;
                if n < kept {
                    return Err(StoreError::Invalid {
                        block,
                        reason: format!("truncate to {len}: only {} bytes there", start + n as u64),
                    });
                }
                let mut crc = [0u8; 4];
                meta::encode_crcs(&[spec.checksum(&buf[..kept])], &mut crc);
                std::os::unix::fs::FileExt::write_all_at(
                    &meta.file,
                    &crc,
                    meta::crc_offset(start / bpc),
                )
                .map_err(|e| io_err("write", &meta.path, e))?;
            }
            meta.file
                .set_len(meta::crc_offset(chunks))
                .map_err(|e| io_err("truncate", &meta.path, e))?;
            data.file
                .sync_data()
                .map_err(|e| io_err("fdatasync", &data.path, e))?;
            meta.file
                .sync_data()
                .map_err(|e| io_err("fdatasync", &meta.path, e))
        })
        .await?;
        let mut st = self.state();
        st.len = len;
        st.landed = len;
        st.ahead.clear();
        st.failed = None;
        if let Some(e) = self.store.index().get_mut(&self.block) {
            e.len = len;
        }
        Ok(())
    }

    /// Gives the replica a new, larger generation stamp while it is being written.
    pub async fn bump_genstamp(&self, new: GenStamp) -> Result<(), StoreError> {
        let _guard = self.tail.write().await;
        // The files are renamed to the new stamp: they must exist.
        self.files().await?;
        let old = self.genstamp();
        self.store.bump_genstamp(self.block, old, new).await?;
        self.state().genstamp = new;
        Ok(())
    }

    /// Makes the replica durable and complete: waits for writes in flight, seals the meta
    /// header, makes data and meta durable through the store's group commit, and moves
    /// both into `finalized` (meta first). One commit: a crash before the move is durable
    /// leaves a sealed replica that the next open finishes moving.
    /// Returns the length. Later writes are refused.
    pub async fn finalize(&self) -> Result<u64, StoreError> {
        self.finish(None).await?;
        Ok(self.mark_finalized())
    }

    /// Runs a reserved write as the replica's last and finalizes it (see
    /// [`ReservedWrite::write_and_finalize`]).
    async fn write_final(&self, p: Parts) -> Result<u64, StoreError> {
        let Some(r) = p.reservation else {
            return self.finalize().await;
        };
        let ticket = self.ticket(r, p.offset, &p.data);
        let result = self.finish(Some((r, &p))).await;
        ticket.settle(&result);
        result?;
        Ok(self.mark_finalized())
    }

    /// Finalize, with the replica's last write done by the committer just before the
    /// seal when there is one: waits for the writes before it, then one hand-off seals,
    /// commits and moves the replica. On success the replica is final on disk; the
    /// caller records it.
    async fn finish(&self, last: Option<(Reservation, &Parts)>) -> Result<(), StoreError> {
        // Writes reserved but not yet started hold no lock: wait for them by ticket
        // first (they need the lock to start), then take the tail alone.
        self.wait_landed(last.map_or(u64::MAX, |(r, _)| r.ticket))
            .await?;
        let _guard = self.tail.write().await;
        let gs = {
            let st = self.state();
            if let Some(reason) = st.failed.clone() {
                return Err(StoreError::WriterFailed {
                    block: self.block,
                    reason,
                });
            }
            st.genstamp
        };
        let e = self.store.lookup(self.block, gs)?;
        if e.state != ReplicaState::Rbw {
            return Err(StoreError::WrongState {
                block: self.block,
                state: e.state,
                needed: ReplicaState::Rbw,
            });
        }
        let write = last.map(|(_, p)| {
            let (data, crcs, meta_at, direct) = self.buffers(p.offset, &p.data, &p.crcs);
            let end = p.offset + p.data.len() as u64;
            let bpc = u64::from(self.spec.bytes_per_chunk());
            super::commit::LastWrite {
                offset: p.offset,
                data,
                // The padded tail of a short last chunk goes to disk: cut it off.
                cut_to: (direct && !end.is_multiple_of(bpc)).then_some(end),
                meta_at,
                crcs,
            }
        });
        // Files nothing has created yet are created by the committer: the whole replica
        // then costs one hand-off.
        let files = match self.files.get() {
            Some(f) => super::commit::FinalizeFiles::Open(f.clone()),
            None => super::commit::FinalizeFiles::Create(
                self.store.inner.new_files(self.block, gs, self.spec),
            ),
        };
        // Sealed, then data and meta durable (one group commit), then the renames, all
        // on the committer's thread. The renames become durable with a later commit:
        // until then a crash leaves a sealed `rbw` replica, which recovery finishes (see
        // `meta`).
        let done = self
            .store
            .inner
            .committer
            .finalize(super::commit::Finalize {
                block: self.block,
                genstamp: gs,
                files,
                header: meta::encode_sealed_header(self.block, self.spec),
                write,
            })
            .await;
        if let Err(e) = &done {
            // After a failed sync the page cache cannot be trusted to hold what was
            // written (nor the seal to be absent); sealed but not moved, the replica is
            // never written through this writer again either.
            self.state().failed.get_or_insert_with(|| e.to_string());
        }
        done
    }

    /// Records a finalize that succeeded; returns the length.
    fn mark_finalized(&self) -> u64 {
        let len = {
            let mut st = self.state();
            st.finalized = true;
            st.len
        };
        if let Some(e) = self.store.index().get_mut(&self.block) {
            e.state = ReplicaState::Finalized;
            e.len = len;
        }
        len
    }
}

/// The ticket of a write that runs: settled with its outcome, or, if dropped first (a
/// write never started, or one whose future was dropped half way), settled as a failed
/// write, so that nothing waits for it forever.
struct Ticket<'a> {
    writer: &'a ReplicaWriter,
    ticket: u64,
    offset: u64,
    end: u64,
    open: bool,
}

impl Ticket<'_> {
    fn settle<T>(mut self, result: &Result<T, StoreError>) {
        self.open = false;
        self.writer
            .settle(self.ticket, self.offset, self.end, result);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.open {
            let dropped: Result<(), _> = Err(StoreError::WriterFailed {
                block: self.writer.block,
                reason: format!("the write at {} was dropped before it landed", self.offset),
            });
            self.writer
                .settle(self.ticket, self.offset, self.end, &dropped);
        }
    }
}

/// What a reserved write runs.
struct Parts {
    /// `None` for empty data.
    reservation: Option<Reservation>,
    /// A sync after the write waits for every ticket below this.
    limit: u64,
    offset: u64,
    data: Bytes,
    crcs: Vec<u32>,
}

/// A write checked and reserved by [`ReplicaWriter::reserve_owned`] that has not run yet.
/// Its range belongs to the replica from the reservation on: later writes are placed
/// after it, and the replica's finalize and recovery wait for it. Dropped unrun, it runs
/// on its own as a task of the current runtime; with no runtime to run it on, it fails
/// the writer instead (a recovery's truncate clears that) rather than leave it waiting.
#[must_use = "a reserved write runs only when asked to"]
pub struct ReservedWrite {
    writer: Arc<ReplicaWriter>,
    parts: Option<Parts>,
}

impl std::fmt::Debug for ReservedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ReservedWrite");
        d.field("block", &self.writer.block);
        if let Some(p) = &self.parts {
            d.field("offset", &p.offset).field("len", &p.data.len());
        }
        d.finish()
    }
}

impl ReservedWrite {
    /// Runs the write; with [`Durability::Sync`] it returns once this write and every
    /// write reserved before it are durable. The future borrows nothing and can be
    /// spawned.
    pub fn write(
        mut self,
        durability: Durability,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let parts = self.parts.take();
        let writer = self.writer.clone();
        async move {
            match parts {
                Some(p) => writer.run_parts(p, durability).await,
                None => Ok(()),
            }
        }
    }

    /// Runs the write as the replica's last one and finalizes the replica (see
    /// [`ReplicaWriter::finalize`]); returns its length. The data, its checksums and the
    /// seal are written by the store's committer in the batch whose one sync makes them
    /// durable: one hand-off for the whole of a small block's replica instead of a write
    /// through an IO thread and then a finalize.
    pub fn write_and_finalize(
        mut self,
    ) -> impl std::future::Future<Output = Result<u64, StoreError>> + Send + 'static {
        let parts = self.parts.take();
        let writer = self.writer.clone();
        async move {
            match parts {
                Some(p) => writer.write_final(p).await,
                None => writer.finalize().await,
            }
        }
    }
}

impl Drop for ReservedWrite {
    fn drop(&mut self) {
        let Some(p) = self.parts.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let writer = self.writer.clone();
                rt.spawn(async move { writer.run_parts(p, Durability::Buffered).await });
            }
            Err(_) => self.writer.abandon(p),
        }
    }
}

enum Guard<'a> {
    Read(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Write(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns the count.
fn read_full_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match std::os::unix::fs::FileExt::read_at(file, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
