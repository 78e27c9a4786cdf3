//! Multiversioning for plain loops that the compiler vectorises: `multiversion!` compiles a function's
//! body for AVX-512, for AVX2 + FMA and for the baseline, and picks one at run time from
//! [`Kernel::detect`](crate::kernel::Kernel::detect) (so `BLEEP_RS_KERNEL=portable` forces the
//! baseline here too). Everything the body calls must be `#[inline]` to inherit the features.

use crate::kernel::Kernel;

/// The vector extension to run: 2 = AVX-512, 1 = AVX2 + FMA, 0 = baseline (decided once).
pub fn level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| match Kernel::detect() {
        Kernel::Avx512Bf16 | Kernel::Avx512 if full_avx512() => 2,
        Kernel::Avx512Bf16 | Kernel::Avx512 | Kernel::Avx2 => 1,
        Kernel::Portable => 0,
    })
}

fn full_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("bmi2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `multiversion! { fn name(args) -> ret { body } }` defines `name` with the dispatch described above.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            match crate::simd::level() {
                // SAFETY: the level is what the CPU reports it supports.
                #[cfg(target_arch = "x86_64")]
                2 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                1 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

pub(crate) use multiversion;
