//! The portable backend: positional reads and writes and fdatasync on a small pool of
//! plain threads.

use std::os::unix::fs::FileExt;

use super::Op;

pub(super) fn execute(op: Op) {
    match op {
        Op::Write {
            file,
            offset,
            buf,
            reply,
        } => {
            let res = file.file.write_all_at(&buf, offset);
            let _ = reply.send((res, buf));
        }
        Op::Read {
            file,
            offset,
            len: want,
            mut buf,
            reply,
        } => {
            let want = want.min(buf.capacity());
            buf.set_len(want);
            let mut done = 0;
            let res = loop {
                if done == want {
                    break Ok(done);
                }
                match file.file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break Ok(done),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            buf.set_len(done);
            let _ = reply.send((res, buf));
        }
        Op::Sync { file, reply } => {
            let _ = reply.send(rustix::fs::syncfs(&file.file).map_err(Into::into));
        }
        Op::Barrier { reply } => {
            let _ = reply.send(());
        }
    }
}
