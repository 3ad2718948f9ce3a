//! Workload hooks (`ferry:hooks@0.1.0`, `wit/ferry-hooks@0.1.0`) an adapter may export
//! beside its world: the [`Hooks`] trait with defaults that do nothing, and
//! [`export_hooks!`](crate::export_hooks). The gateway calls them after the site's own
//! `[hooks]`: `post-checkpoint` after every checkpoint taken at the site (an error is
//! logged), `pre-restore` before every restore (an error refuses it). They run in the
//! adapter's instance, so `exec`, `log` and the rest are the adapter's own grants.
//!
//! ```ignore
//! impl ferry_adapter_sdk::hooks::Hooks for MyAdapter {
//!     fn pre_restore(about: About) -> Result<(), String> { /* … */ }
//! }
//! ferry_adapter_sdk::export_hooks!(MyAdapter);
//! ```

wit_bindgen::generate!({
    path: "../../wit/ferry-hooks@0.1.0",
    world: "workload-hooks",
    pub_export_macro: true,
    export_macro_name: "export_hooks_world",
    default_bindings_module: "ferry_adapter_sdk::hooks",
});

pub use exports::ferry::hooks::hooks::About;

/// What an adapter's hooks do; each defaults to nothing.
pub trait Hooks {
    /// After a checkpoint of `about.workload` was taken at this site.
    fn post_checkpoint(_about: About) -> Result<(), String> {
        Ok(())
    }

    /// Before `about.workload` is restored at this site; an error refuses the restore.
    fn pre_restore(_about: About) -> Result<(), String> {
        Ok(())
    }
}

/// Exports `$ty`'s [`Hooks`] as `ferry:hooks/hooks@0.1.0`.
#[macro_export]
macro_rules! export_hooks {
    ($ty:ident) => {
        impl $crate::hooks::exports::ferry::hooks::hooks::Guest for $ty {
            fn post_checkpoint(about: $crate::hooks::About) -> Result<(), String> {
                <$ty as $crate::hooks::Hooks>::post_checkpoint(about)
            }
            fn pre_restore(about: $crate::hooks::About) -> Result<(), String> {
                <$ty as $crate::hooks::Hooks>::pre_restore(about)
            }
        }
        $crate::hooks::export_hooks_world!($ty with_types_in $crate::hooks);
    };
}
