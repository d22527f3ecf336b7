//! The backend of a LoRA adapter's model id (`<base>:<name>`, `[[models."<base>".adapters]]`):
//! its requests go to the base model's backend with the adapter named on them, so they share
//! the base model's engine (and its slot in the memory budget) and are batched with the base
//! model's requests and other adapters'. The engine side is `crate::local::adapters`.

use std::sync::Arc;

use tollgate_gateway::backend::{
    AdapterRef, Backend, BackendError, GenerateRequest, LoadReport, ModelInfo, Prepared, Residency,
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
