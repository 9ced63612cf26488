//! Compute threads run at a lower OS priority than the threads that answer HTTP.
//!
//! On a CPU host the matmuls (candle's through gemm on rayon's global pool) keep every
//! core busy while a batch runs. At equal priority a woken HTTP thread waits its turn
//! behind them, so `/health` and the 429s of admission took 100+ ms under load on a
//! 2-core machine. A higher nice value on the compute threads lets the kernel run the
//! HTTP threads first; the compute threads still get every cycle nobody else wants.

/// Nice value added to compute threads (CFS weight 1024 -> 110 at +10) unless
/// `TAGLLM_COMPUTE_NICE` says otherwise (0 turns it off, e.g. to measure its effect).
pub const COMPUTE_NICE_INCREMENT: i32 = 10;

fn nice_increment() -> i32 {
    std::env::var("TAGLLM_COMPUTE_NICE")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(COMPUTE_NICE_INCREMENT, |n| n.clamp(0, 19))
}

/// Builds rayon's global pool (which gemm, and so candle's CPU matmuls, run on) and
/// candle's own pool for elementwise ops with lowered priority. Call it before the first
/// tensor op; where a pool already exists (a second service in one process) it stays as
/// it is.
pub fn lower_compute_pool_priority() {
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .thread_name(|i| format!("compute-{i}"))
        .start_handler(|_| lower_this_thread_priority())
        .build_global();
    if let Err(e) = built {
        tracing::debug!("rayon's global pool already exists: {e}");
    }
    // candle runs elementwise ops on a pool of its own (`candle-bp-N`, which spins
    // between jobs), made on first use by whichever thread needs it first; its threads
    // inherit that thread's nice value, and were found at 0 beside the lowered compute
    // threads. Made here from a lowered thread, they stay below the HTTP threads too.
    let lowered = std::thread::Builder::new().spawn(|| {
        lower_this_thread_priority();
        candle_core::utils::barrier_pool().n_workers()
    });
    if lowered.map(|t| t.join()).is_err() {
        tracing::debug!("could not start candle's pool from a lowered thread");
    }
}

/// Lowers the calling thread's priority (only the thread's: Linux's nice is per thread).
pub fn lower_this_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread's own id; no memory is shared.
    unsafe {
        let increment = nice_increment();
        if increment == 0 {
            return;
        }
        let tid = libc::gettid() as libc::id_t;
        // getpriority can return -1 as a value; errno tells, but a failed lowering is
        // harmless, so only the set is checked.
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        let wanted = (now + increment).min(19);
        if libc::setpriority(libc::PRIO_PROCESS, tid, wanted) != 0 {
            tracing::debug!("could not lower a compute thread's priority");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn lowering_changes_only_the_calling_thread() {
        let own = || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as _) };
        let before = own();
        let lowered = std::thread::spawn(move || {
            lower_this_thread_priority();
            own()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, (before + COMPUTE_NICE_INCREMENT).min(19));
        assert_eq!(own(), before, "the spawning thread keeps its priority");
    }
}
