//! A stand-in for the `vmm` thread behind the REST API: the same lifecycle (Configured →
//! Running ⇄ Paused → Stopped) and the same answers, without a guest. Shared by the server
//! tests and `examples/fake_server.rs` (which schemathesis drives).

use api::{
    ActionType, InstanceInfo, PendingConfig, RequestError, RequestedState, VmState, VmmRequest,
    VmmResponse,
};

pub struct FakeVmm {
    pub state: VmState,
    pub pending: PendingConfig,
}

impl Default for FakeVmm {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeVmm {
    pub fn new() -> Self {
        FakeVmm {
            state: VmState::Configured,
            pending: PendingConfig::default(),
        }
    }

    pub fn handle(&mut self, request: VmmRequest) -> Result<VmmResponse, RequestError> {
        use VmState::*;
        if request.is_pre_boot() && self.state != Configured {
            return Err(RequestError::Conflict(
                "the VM has started: pre-boot resources can no longer change".into(),
            ));
        }
        match request {
            VmmRequest::GetInfo => Ok(VmmResponse::Info(InstanceInfo {
                id: "fake".into(),
                state: self.state,
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                app_name: "chapeau".into(),
            })),
            VmmRequest::GetConfig => Ok(VmmResponse::Config(self.pending.to_json())),
            VmmRequest::GetMetrics => Ok(VmmResponse::Metrics(serde_json::json!({
                "utc_timestamp_ms": 0,
                "state": "Not started",
                "api_requests": 1
            }))),
            VmmRequest::PutLogger(logger) => match logger.level.as_deref() {
                None | Some("error" | "warn" | "info" | "debug" | "trace") => {
                    Ok(VmmResponse::Empty)
                }
                Some(level) => Err(RequestError::BadRequest(format!(
                    "invalid logger level {level:?}: expected error, warn, info, debug or trace"
                ))),
            },
            VmmRequest::PutMetrics(_) => Ok(VmmResponse::Empty),
            VmmRequest::Action(action) => self.action(action),
            VmmRequest::SetState(requested) => self.set_state(requested),
            put => {
                self.pending.apply(put)?;
                Ok(VmmResponse::Empty)
            }
        }
    }

    fn action(&mut self, action: ActionType) -> Result<VmmResponse, RequestError> {
        use VmState::*;
        match (action, self.state) {
            (ActionType::InstanceStart, Configured) => {
                self.pending.to_config()?;
                self.state = Running;
            }
            (ActionType::InstanceStart, _) => {
                return Err(RequestError::Conflict("the VM has already started".into()))
            }
            (ActionType::SendCtrlAltDel, Running | Paused) => {}
            (ActionType::SendCtrlAltDel, _) => {
                return Err(RequestError::Conflict("the VM is not running".into()))
            }
            (ActionType::Shutdown, Stopped) => {
                return Err(RequestError::Conflict("the VM has already stopped".into()))
            }
            (ActionType::Shutdown, _) => self.state = Stopped,
        }
        Ok(VmmResponse::Empty)
    }

    fn set_state(&mut self, requested: RequestedState) -> Result<VmmResponse, RequestError> {
        use VmState::*;
        self.state = match (requested, self.state) {
            (RequestedState::Paused, Running) => Paused,
            (RequestedState::Resumed, Paused) => Running,
            (RequestedState::Paused, Paused) => {
                return Err(RequestError::Conflict("the VM is already paused".into()))
            }
            (RequestedState::Resumed, Running) => {
                return Err(RequestError::Conflict("the VM is not paused".into()))
            }
            (_, state) => {
                return Err(RequestError::Conflict(format!(
                    "the VM is not running (state {state:?})"
                )))
            }
        };
        Ok(VmmResponse::Empty)
    }
}
