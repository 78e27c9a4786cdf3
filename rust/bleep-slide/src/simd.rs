//! Multiversioning for plain loops that the compiler vectorises: `multiversion!` compiles a function's
//! body for AVX-512, for AVX2 + FMA and for the baseline, and picks one at run time from the level
//! [`bleep_core::cpu`] decided (so `BLEEP_RS_KERNEL=portable` forces the baseline here too). Everything
//! the body calls must be `#[inline]` to inherit the features.

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
            match bleep_core::cpu::cpu().simd {
                // SAFETY: the level is one the CPU supports.
                #[cfg(target_arch = "x86_64")]
                bleep_core::cpu::SimdLevel::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                bleep_core::cpu::SimdLevel::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

pub(crate) use multiversion;
