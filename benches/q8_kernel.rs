//! Q8_0 kernel vs candle's QMatMul (Q8_0) on the model's hot shapes.
//! `cargo bench -p qwen-ocr-model --bench q8_kernel` (set RAYON_NUM_THREADS=2 to match the
//! server). Prints medians of 5 runs; the host is shared, so compare columns, not absolutes.
//! `Q8_BENCH_NO_CANDLE=1` skips candle; `Q8_BENCH_DECODE=0` skips the (memory-hungry) decode case;
//! `Q8_BENCH_F32=1` adds the f32 product `--quant none` runs (candle's matmul, i.e. gemm).
//! Diagnostics: `Q8_BENCH_PEAK=1` (register-only vpdpbusd rate of one core, the ceiling),
//! `Q8_BENCH_L2=1` (per-CPU-second rates, kernels alone vs the whole matmul).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use qwen_ocr_model::kernels::q8::Q8Weights;

const REPS: usize = 5;

/// Deterministic pseudo-random values in [-1, 1) from (seed, index): cheap enough to fill
/// hundreds of MB without an RNG state per row.
fn val(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 31;
    z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 29;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

fn data(seed: u64, len: usize) -> Vec<f32> {
    (0..len as u64).map(|i| val(seed, i)).collect()
}

fn ours(seed: u64, n: usize, k: usize) -> Q8Weights {
    Q8Weights::quantize(n, k, |i, row| {
        for (t, v) in row.iter_mut().enumerate() {
            *v = val(seed, (i * k + t) as u64);
        }
    })
}

fn candle(seed: u64, n: usize, k: usize) -> QMatMul {
    let w = Tensor::from_vec(data(seed, n * k), (n, k), &Device::Cpu).unwrap();
    QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap()
}

/// The f32 weights as `--quant none`'s `Linear` multiplies by them: `x · Wᵀ`.
fn f32_weights(seed: u64, n: usize, k: usize) -> Tensor {
    Tensor::from_vec(data(seed, n * k), (n, k), &Device::Cpu).unwrap()
}

/// Median time of `x · Wᵀ` in f32, formatted as (ms, GOP/s); dashes when not asked for.
fn f32_column(asked: bool, ops: f64, run: impl FnMut()) -> (String, String) {
    if !asked {
        return ("-".into(), "-".into());
    }
    let t = time(run);
    (format!("{:.2}", t * 1e3), format!("{:.0}", ops / t))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> f64 {
    f(); // warm-up (page faults, pool start)
    median(
        (0..REPS)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// Process CPU seconds (user + system) from /proc/self/stat: on a shared 2-vCPU host, work
/// per CPU-second is a far steadier figure than wall time when others preempt us.
fn cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// Runs `f` for about a second; returns (GOP per wall second, GOP per CPU second).
fn rates(ops: f64, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let (t, c) = (Instant::now(), cpu_secs());
    let mut n = 0;
    while t.elapsed().as_secs_f64() < 1.0 {
        f();
        n += 1;
    }
    let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_secs() - c);
    (n as f64 * ops / wall, n as f64 * ops / cpu.max(0.01))
}

/// `Q8_BENCH_L2=1`: kernel efficiency apart from memory and threading. Prints GOP/s per
/// wall second and per CPU second (the latter is what to compare between variants here).
fn l2_only() {
    let shapes: &[(usize, usize, usize)] = &[(96, 1536, 256), (1564, 1280, 3840), (464, 1536, 8960), (1564, 5120, 1280)];
    for &(m, k, n) in shapes {
        let x = data(1, m * k);
        let w = ours(2, n, k);
        let mut y = vec![0f32; m * n];
        let ops = 2.0 * (m * n * k) as f64 / 1e9;
        let (mw, mc) = rates(ops, || w.matmul(&x, m, &mut y));
        let (kw, kc) =
            if m < 200 { rates(ops, || qwen_ocr_model::kernels::q8::__bench_kernels_only(&w, &x, m, &mut y, 1)) } else { (0.0, 0.0) };
        println!(
            "{m}x{k}x{n}: matmul {mw:.0} GOP/s wall, {mc:.0} per CPU-s; kernels only {kw:.0} wall, {kc:.0} per CPU-s (threads {}, load {})",
            rayon::current_num_threads(),
            load()
        );
    }
}

/// `Q8_BENCH_PEAK=1`: register-only vpdpbusd throughput, the ceiling for one core.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn vnni_peak() -> f64 {
    use std::arch::x86_64::*;
    let a = std::hint::black_box(_mm512_set1_epi8(3));
    let b = std::hint::black_box(_mm512_set1_epi8(-1));
    let mut acc = [_mm512_setzero_si512(); 12];
    let iters = 20_000_000u64;
    let t = Instant::now();
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_dpbusd_epi32(*v, a, b);
        }
    }
    let dt = t.elapsed().as_secs_f64();
    let s: i32 = acc.iter().map(|v| _mm512_reduce_add_epi32(*v)).sum();
    std::hint::black_box(s);
    (iters * 12 * 64 * 2) as f64 / dt / 1e9
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    if std::env::var("Q8_BENCH_PEAK").is_ok() {
        // SAFETY: only for experiments on VNNI machines.
        println!("vpdpbusd peak, 1 core: {:.0} GOP/s", unsafe { vnni_peak() });
        return;
    }
    if std::env::var("Q8_BENCH_L2").is_ok() {
        return l2_only();
    }
    let with_candle = std::env::var("Q8_BENCH_NO_CANDLE").is_err();
    let with_f32 = std::env::var("Q8_BENCH_F32").is_ok();
    println!("q8_kernel: rayon threads {}, load {}", rayon::current_num_threads(), load());
    let prefill = [
        ("vision qkv", 1564, 1280, 3840),
        ("vision fc1", 1564, 1280, 5120),
        ("vision fc2", 1564, 5120, 1280),
        ("decoder up", 464, 1536, 8960),
    ];
    println!(
        "{:<12} {:>18} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "shape", "m x k x n", "ours ms", "GOP/s", "candle ms", "GOP/s", "f32 ms", "GOP/s"
    );
    for (name, m, k, n) in prefill {
        let ops = 2.0 * (m * n * k) as f64 / 1e9;
        let x = data(1, m * k);
        let w = ours(2, n, k);
        let mut y = vec![0f32; m * n];
        let t = time(|| w.matmul(&x, m, &mut y));
        drop(w);
        let (tc, gc) = if with_candle {
            let c = candle(2, n, k);
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let tc = time(|| {
                c.forward(&xt).unwrap();
            });
            (format!("{:.2}", tc * 1e3), format!("{:.0}", ops / tc))
        } else {
            ("-".into(), "-".into())
        };
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let wf = with_f32.then(|| f32_weights(2, n, k));
        let (tf, gf) = f32_column(with_f32, ops, || {
            xt.matmul(&wf.as_ref().unwrap().t().unwrap()).unwrap();
        });
        println!("{name:<12} {:>18} {:>10.2} {:>10.0} {tc:>10} {gc:>10} {tf:>10} {gf:>10}", format!("{m}x{k}x{n}"), t * 1e3, ops / t);
    }

    if std::env::var("Q8_BENCH_DECODE").map(|v| v != "0").unwrap_or(true) {
        // One token through 28 different 1536x8960 matrices (~410 MB), so weights come from DRAM.
        let (layers, k, n) = (28, 1536, 8960);
        let x = data(3, k);
        let ws: Vec<Q8Weights> = (0..layers).map(|l| ours(100 + l as u64, n, k)).collect();
        let bytes: usize = ws.iter().map(|w| w.bytes()).sum();
        let mut y = vec![0f32; n];
        let t = time(|| ws.iter().for_each(|w| w.matmul(&x, 1, &mut y)));
        drop(ws);
        let cand = if with_candle {
            let cs: Vec<QMatMul> = (0..layers).map(|l| candle(100 + l as u64, n, k)).collect();
            let xt = Tensor::from_vec(x.clone(), (1, k), &Device::Cpu).unwrap();
            let tc = time(|| {
                for c in &cs {
                    c.forward(&xt).unwrap();
                }
            });
            format!("candle {:.2} ms ({:.1} GB/s of Q8_0)", tc * 1e3, (layers * n * k / 32 * 34) as f64 / tc / 1e9)
        } else {
            String::new()
        };
        let f32_decode = if with_f32 {
            let wf: Vec<Tensor> = (0..layers).map(|l| f32_weights(100 + l as u64, n, k)).collect();
            let xt = Tensor::from_vec(x.clone(), (1, k), &Device::Cpu).unwrap();
            let tf = time(|| {
                for w in &wf {
                    xt.matmul(&w.t().unwrap()).unwrap();
                }
            });
            format!("f32 {:.2} ms ({:.1} GB/s)", tf * 1e3, (layers * n * k * 4) as f64 / tf / 1e9)
        } else {
            String::new()
        };
        println!(
            "decode 28 x 1x{k}x{n}: ours {:.2} ms ({:.1} GB/s of {} MB)   {cand}   {f32_decode}",
            t * 1e3,
            bytes as f64 / t / 1e9,
            bytes >> 20
        );
    }
    println!("load after: {}", load());
}
