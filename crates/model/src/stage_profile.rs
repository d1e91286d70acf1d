//! Where the forward passes spend their wall time: per phase (the vision tower, steps with a
//! prefill, steps that only decode) and per operation inside it (weight products, LoRA deltas,
//! packing activations for the quantized products, attention, norms, sampling), so that a
//! speed change starts from a measurement instead of a guess.
//!
//! Off unless `QWEN_OCR_STAGE_PROFILE=1` is set when the process starts. Off, a timer is one
//! load of a flag read once; on, two clock reads and two relaxed atomic adds, which next to the
//! products they time (milliseconds) is noise. Times are taken on the thread that runs the
//! model (the engine's), around work that may fan out to the thread pool inside, so they are
//! wall times that add up within a phase. On CUDA the kernels run asynchronously, so only the
//! phase totals mean anything there.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// What a forward pass is doing. A step with any prefilling sequence counts as `Prefill` (its
/// prompt rows dwarf the decode rows beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Vision,
    Prefill,
    Decode,
}

/// An operation inside a phase. `Packing` happens inside `Products` (it is shown apart
/// because it is the part a better weight layout does not help); the others do not overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The whole phase, for what the operations below leave over.
    Total,
    Products,
    Packing,
    Lora,
    Attention,
    Norms,
    Sampling,
}

const PHASES: [Phase; 3] = [Phase::Vision, Phase::Prefill, Phase::Decode];
const OPS: [Op; 7] = [Op::Total, Op::Products, Op::Packing, Op::Lora, Op::Attention, Op::Norms, Op::Sampling];

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Vision => "vision",
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        }
    }
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Total => "total",
            Op::Products => "products",
            Op::Packing => "packing",
            Op::Lora => "lora",
            Op::Attention => "attention",
            Op::Norms => "norms",
            Op::Sampling => "sampling",
        }
    }
}

/// Nanoseconds and calls per (phase, op), since the process started.
struct Totals {
    nanos: [[AtomicU64; OPS.len()]; PHASES.len()],
    calls: [[AtomicU64; OPS.len()]; PHASES.len()],
}

static TOTALS: Totals = Totals {
    nanos: [const { [const { AtomicU64::new(0) }; OPS.len()] }; PHASES.len()],
    calls: [const { [const { AtomicU64::new(0) }; OPS.len()] }; PHASES.len()],
};

thread_local! {
    /// The phase this thread is in; operations outside any phase (e.g. on pool threads, or
    /// while loading) are not counted.
    static CURRENT: Cell<Option<Phase>> = const { Cell::new(None) };
}

pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("QWEN_OCR_STAGE_PROFILE").is_ok_and(|v| matches!(v.as_str(), "1" | "on" | "true")))
}

/// Times an operation until dropped, if the profile is on and this thread is in a phase.
#[must_use = "the operation is timed until this is dropped"]
pub struct Timer {
    running: Option<(Phase, Op, Instant)>,
    /// The phase to go back to, for a phase timer.
    restore: Option<Option<Phase>>,
}

/// Enters `phase` on this thread until the returned timer drops, timing it as a whole.
pub fn phase(phase: Phase) -> Timer {
    if !enabled() {
        return Timer { running: None, restore: None };
    }
    let previous = CURRENT.with(|c| c.replace(Some(phase)));
    Timer { running: Some((phase, Op::Total, Instant::now())), restore: Some(previous) }
}

/// Times `op` within this thread's current phase.
pub fn op(op: Op) -> Timer {
    let running = if enabled() { CURRENT.with(Cell::get).map(|phase| (phase, op, Instant::now())) } else { None };
    Timer { running, restore: None }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((phase, op, started)) = self.running {
            let (p, o) = (phase as usize, op as usize);
            TOTALS.nanos[p][o].fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            TOTALS.calls[p][o].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(previous) = self.restore {
            CURRENT.with(|c| c.set(previous));
        }
    }
}

/// One (phase, op) pair's totals since the process started.
#[derive(Debug, Clone, PartialEq)]
pub struct StageTotal {
    pub phase: &'static str,
    pub op: &'static str,
    pub nanos: u64,
    pub calls: u64,
}

/// Every pair that has run at least once, phases and operations in their declared order.
pub fn totals() -> Vec<StageTotal> {
    let mut out = Vec::new();
    for phase in PHASES {
        for op in OPS {
            let (p, o) = (phase as usize, op as usize);
            let calls = TOTALS.calls[p][o].load(Ordering::Relaxed);
            if calls > 0 {
                out.push(StageTotal { phase: phase.name(), op: op.name(), nanos: TOTALS.nanos[p][o].load(Ordering::Relaxed), calls });
            }
        }
    }
    out
}
