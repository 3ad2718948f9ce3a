//! `decider-standby`: a restart decider (`ferry:decider@0.1.0`) that leaves every ended
//! workload in standby (image kept, nothing running) for an operator to look at, where
//! the built-in decider would restore a crash or restart a failure. Installed as
//! `PLUGINS/deciders/decider-standby.wasm`; a workload uses it with
//! `--restart on-failure --decider decider-standby`.

wit_bindgen::generate!({
    path: "../../wit/ferry-decider@0.1.0",
    world: "restart-decider",
});


// `Action` and `ExitInfo` are the world's own (it `use`s them from `types`).
struct Standby;

impl Guest for Standby {
    fn decide(_info: ExitInfo) -> Action {
        Action::Standby
    }
}

export!(Standby);
