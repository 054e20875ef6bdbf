//! Typed errors: [`ServerError`] for [`crate::serve`], [`ApiError`] for HTTP responses in the
//! shape of the protocol the client speaks.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Errors that stop the server (startup failures, a dead engine).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid option: {0}")]
    BadOption(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("engine: {0}")]
    Engine(#[from] ds4_model::ModelError),
    #[error("disk KV cache: {0}")]
    Kv(#[from] ds4_kvstore::KvError),
    #[error("test script {path}: {reason}")]
    Script { path: String, reason: String },
}

/// Which wire protocol a route speaks (decides error and event shapes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completions,
    /// `/v1/responses`
    Responses,
    /// `/v1/messages` and `/v1/messages/count_tokens`
    Messages,
    /// Everything else (models, health, metrics, unknown paths).
    Other,
}

impl Api {
    /// Route label for metrics and traces.
    pub fn name(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completions => "completions",
            Api::Responses => "responses",
            Api::Messages => "messages",
            Api::Other => "other",
        }
    }

    /// Anthropic-shaped errors.
    pub fn is_anthropic(self) -> bool {
        self == Api::Messages
    }

    /// The request member a context overflow is blamed on.
    fn prompt_param(self) -> &'static str {
        match self {
            Api::Responses => "input",
            Api::Completions => "prompt",
            _ => "messages",
        }
    }
}

/// An HTTP error with a protocol-shaped JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub api: Api,
    /// `code` member (OpenAI), e.g. `context_length_exceeded`.
    pub code: Option<&'static str>,
    /// `param` member (OpenAI).
    pub param: Option<&'static str>,
    /// `(n_prompt_tokens, n_ctx)` for context overflows.
    pub context: Option<(usize, usize)>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(status: StatusCode, api: Api, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            api,
            code: None,
            param: None,
            context: None,
            retry_after: None,
        }
    }

    /// 400 with `message`.
    pub fn bad_request(api: Api, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, api, message)
    }

    /// 400 `invalid JSON request`.
    pub fn invalid_json(api: Api) -> ApiError {
        ApiError::bad_request(api, "invalid JSON request")
    }

    /// 400 `context_length_exceeded` with ds4's wording and fields.
    pub fn context_length(api: Api, n_prompt: usize, n_ctx: usize) -> ApiError {
        let mut e = ApiError::bad_request(
            api,
            format!(
                "Prompt has {n_prompt} tokens, but the configured context size is {n_ctx} tokens"
            ),
        );
        e.code = Some("context_length_exceeded");
        e.param = Some(api.prompt_param());
        e.context = Some((n_prompt, n_ctx));
        e
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(api: Api, message: impl Into<String>, retry_after: u64) -> ApiError {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, api, message);
        e.retry_after = Some(retry_after);
        e
    }

    /// 500 with the engine's error text.
    pub fn internal(api: Api, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, api, message)
    }

    fn openai_type(&self) -> &'static str {
        if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        if self.api.is_anthropic() {
            let mut err = json!({"type": self.anthropic_type(), "message": self.message});
            if let Some((n, c)) = self.context {
                err["n_prompt_tokens"] = n.into();
                err["n_ctx"] = c.into();
            }
            json!({"type": "error", "error": err})
        } else {
            let mut err = json!({"message": self.message, "type": self.openai_type()});
            if let Some(p) = self.param {
                err["param"] = p.into();
            }
            let code = self.code.or(match self.status.as_u16() {
                401 => Some("invalid_api_key"),
                413 => Some("request_too_large"),
                503 => Some("server_overloaded"),
                _ => None,
            });
            if let Some(c) = code {
                err["code"] = c.into();
            }
            if let Some((n, c)) = self.context {
                err["n_prompt_tokens"] = n.into();
                err["n_ctx"] = c.into();
            }
            json!({ "error": err })
        }
    }

    /// The `data:` payload of an SSE error event sent after the headers (mid-stream errors are
    /// server errors in both protocols).
    pub fn sse_data(&self) -> Value {
        if self.api.is_anthropic() {
            json!({"type": "error", "error": {"type": self.anthropic_type(), "message": self.message}})
        } else {
            let mut b = self.body();
            if self.status.is_server_error() {
                b["error"]["type"] = "server_error".into();
            }
            b
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ds4\""),
            );
        }
        resp
    }
}
