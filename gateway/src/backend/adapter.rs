//! The backend of a LoRA adapter's model id (`<base>:<name>`: an operator's,
//! `[[models."<base>".adapters]]`, or a customer's, `crate::catalogue`): its requests go to
//! the base model's backend with the adapter named on them, so they share the base model's
//! engine (and its slot in the memory budget) and are batched with the base model's requests
//! and other adapters'. The engine side is the binary's `local::adapters`.

use std::sync::Arc;

use super::{
    AdapterRef, Backend, BackendError, GenerateRequest, LoadReport, ModelInfo, Prepared, Prompt,
    Residency, SamplingParams,
};

/// An adapter's model id on its base model's backend.
pub struct AdapterBackend {
    base: Arc<dyn Backend>,
    adapter: AdapterRef,
    id: String,
    owned_by: String,
}

impl AdapterBackend {
    pub fn new(base: Arc<dyn Backend>, adapter: AdapterRef, id: String, owned_by: String) -> Self {
        Self {
            base,
            adapter,
            id,
            owned_by,
        }
    }
}

#[async_trait::async_trait]
impl Backend for AdapterBackend {
    /// The base model's, under the adapter's id.
    fn info(&self) -> ModelInfo {
        ModelInfo {
            id: self.id.clone(),
            owned_by: self.owned_by.clone(),
            ..self.base.info()
        }
    }

    async fn prepare(&self, request: GenerateRequest) -> Result<Prepared, BackendError> {
        let request = GenerateRequest {
            adapter: Some(self.adapter.clone()),
            ..request
        };
        self.base.prepare(request).await
    }

    /// The base model's engine: the adapter's requests are among its load.
    fn load(&self) -> LoadReport {
        self.base.load()
    }

    /// None: the memory and loads are the base model's, reported under its id once (the
    /// adapter is loaded whenever its base is).
    fn residency(&self) -> Option<Residency> {
        None
    }
}

/// Whether `base` (a local model's backend) can apply the adapter `adapter`: its files are read
/// and checked against the base model as a request's would be (loading the base model first
/// when it is not resident), without running anything. `Err(BackendError::Adapter)` names
/// what is wrong with the files.
pub async fn check_adapter(base: &dyn Backend, adapter: AdapterRef) -> Result<(), BackendError> {
    let probe = GenerateRequest {
        request_id: String::new(),
        model: base.info().id,
        prompt: Prompt::Text(" ".into()),
        params: SamplingParams {
            max_tokens: Some(1),
            ..SamplingParams::default()
        },
        response_format: Default::default(),
        tools: None,
        customer: None,
        scheduling_weight: None,
        service_tier: Default::default(),
        max_queue_wait: None,
        prediction: None,
        adapter: Some(adapter),
    };
    // Prepared and never started: nothing reaches the engine's queue.
    base.prepare(probe).await.map(drop)
}
