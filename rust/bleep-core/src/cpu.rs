//! The one place that asks the CPU what it can run, once per process: the score kernel of the search
//! and aggregation, and the vector level of the multiversioned loops (bleep-slide's colour kernels).
//!
//! `BLEEP_RS_KERNEL=portable|avx2|avx512|avx512bf16` asks for a kernel (tests use it to run every path
//! against the same oracle); one the CPU lacks is not used. Otherwise the score kernel is the fastest of
//! those of the best vector width, measured once per CPU model ([`crate::calibrate`]). The vector level
//! follows the flags (or the kernel asked for), so `BLEEP_RS_KERNEL=portable` makes every loop run its
//! baseline version.

use crate::calibrate::Choice;
use std::cell::Cell;
use std::sync::OnceLock;

/// The environment variable that asks for a kernel.
pub const KERNEL_VAR: &str = "BLEEP_RS_KERNEL";

/// Which implementation of the score tile runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// bf16 inputs, fp32 accumulation (`vdpbf16ps`, twice the fp32 FMA rate): a filter whose scores
    /// are within a proven bound of the exact ones; the search rescores its survivors in fp32.
    Avx512Bf16,
    /// fp32 AVX-512 (24 zmm accumulators).
    Avx512,
    /// fp32 AVX2 + FMA.
    Avx2,
    /// Plain Rust, for any CPU.
    Portable,
}

impl Kernel {
    /// The kernel's name, as `BLEEP_RS_KERNEL` and `bleep_rs.kernel_name()` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Bf16 => "avx512bf16",
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    /// Whether this kernel has AVX-512F (the aggregation kernels need nothing more).
    pub fn has_avx512(self) -> bool {
        matches!(self, Kernel::Avx512 | Kernel::Avx512Bf16)
    }

    /// Whether this kernel scores in bf16.
    pub fn is_bf16(self) -> bool {
        self == Kernel::Avx512Bf16
    }
}

/// The vector extension multiversioned loops are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// The baseline target (SSE2 on x86-64).
    Baseline,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F, BW, VL and DQ, with BMI2.
    Avx512,
}

/// What this process runs on this CPU, decided once.
#[derive(Clone, Debug)]
pub struct Cpu {
    /// Every kernel the CPU can run, best first.
    pub available: Vec<Kernel>,
    /// The kernel the flags (or `BLEEP_RS_KERNEL`) point to; the one in use is [`kernel()`], which may
    /// be another of the same vector width that measured faster.
    pub kernel: Kernel,
    /// The level of the multiversioned loops (follows `kernel`).
    pub simd: SimdLevel,
    /// AVX512-VBMI (byte permutes) at [`SimdLevel::Avx512`].
    pub avx512vbmi: bool,
}

/// This CPU, detected on first use.
pub fn cpu() -> &'static Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    CPU.get_or_init(|| {
        let f = Features::detect();
        let available = f.kernels();
        let wanted = std::env::var(KERNEL_VAR).ok();
        let kernel = available
            .iter()
            .copied()
            .find(|k| wanted.as_deref() == Some(k.name()))
            .unwrap_or(available[0]);
        let simd = match kernel {
            Kernel::Portable => SimdLevel::Baseline,
            k if k.has_avx512() && f.avx512_full => SimdLevel::Avx512,
            _ if f.avx2_fma => SimdLevel::Avx2,
            _ => SimdLevel::Baseline,
        };
        Cpu {
            available,
            kernel,
            simd,
            avx512vbmi: simd == SimdLevel::Avx512 && f.avx512vbmi,
        }
    })
}

/// The score kernel in use: the one `BLEEP_RS_KERNEL` asks for, else the fastest measured on this CPU.
pub fn kernel() -> Kernel {
    kernel_choice().kernel
}

/// How [`kernel()`] was chosen (measured once per process, or read from the cache).
pub fn kernel_choice() -> &'static Choice {
    static CHOSEN: OnceLock<Choice> = OnceLock::new();
    thread_local! {
        static CALIBRATING: Cell<bool> = const { Cell::new(false) };
    }
    if let Some(c) = CHOSEN.get() {
        return c;
    }
    // The calibration searches with explicit kernels, but building its index asks for the kernel to
    // pack for: this thread then gets a provisional answer instead of waiting on itself.
    if CALIBRATING.with(Cell::get) {
        static PROVISIONAL: OnceLock<Choice> = OnceLock::new();
        return PROVISIONAL.get_or_init(|| Choice {
            kernel: cpu().kernel,
            reason: "provisional".into(),
            rates: vec![],
            ignored_request: None,
        });
    }
    CALIBRATING.with(|c| c.set(true));
    let choice = crate::calibrate::choose();
    CALIBRATING.with(|c| c.set(false));
    CHOSEN.get_or_init(|| choice)
}

/// The CPU's features that matter here.
struct Features {
    avx512f: bool,
    avx512bf16: bool,
    avx2_fma: bool,
    avx512_full: bool,
    avx512vbmi: bool,
}

impl Features {
    #[cfg(target_arch = "x86_64")]
    fn detect() -> Features {
        use std::arch::is_x86_feature_detected as has;
        Features {
            avx512f: has!("avx512f"),
            avx512bf16: has!("avx512f") && has!("avx512bf16"),
            avx2_fma: has!("avx2") && has!("fma"),
            avx512_full: has!("avx512f")
                && has!("avx512bw")
                && has!("avx512vl")
                && has!("avx512dq")
                && has!("bmi2"),
            avx512vbmi: has!("avx512vbmi"),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn detect() -> Features {
        Features {
            avx512f: false,
            avx512bf16: false,
            avx2_fma: false,
            avx512_full: false,
            avx512vbmi: false,
        }
    }

    /// Every kernel these features run, best first.
    fn kernels(&self) -> Vec<Kernel> {
        let mut out = Vec::new();
        if self.avx512bf16 {
            out.push(Kernel::Avx512Bf16);
        }
        if self.avx512f {
            out.push(Kernel::Avx512);
        }
        if self.avx2_fma {
            out.push(Kernel::Avx2);
        }
        out.push(Kernel::Portable);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_in_use_is_available_and_portable_always_is() {
        let c = cpu();
        assert!(c.available.contains(&c.kernel));
        assert_eq!(c.available.last(), Some(&Kernel::Portable));
        if c.kernel == Kernel::Portable {
            assert_eq!(c.simd, SimdLevel::Baseline);
        }
    }
}
