//! The protocol floor: an ext_proc server that answers every
//! `request_headers` with one fixed header mutation (a static 1 KiB bearer
//! token) and does nothing else. Envoy pointed at it measures what the
//! ext_proc protocol itself costs; our processor should sit right on it.
//!
//! `floor_server 127.0.0.1:PORT` or `floor_server unix:/path.sock`.

use std::pin::Pin;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest,
    ProcessingResponse, TrailersResponse,
};
use futures_util::Stream;
use tonic::{Request, Status, Streaming};

struct Floor {
    answer: ProcessingResponse,
}

#[tonic::async_trait]
impl ExternalProcessor for Floor {
    type ProcessStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, Status> {
        let answer = self.answer.clone();
        let stream = futures_util::stream::unfold(request.into_inner(), move |mut inbound| {
            let answer = answer.clone();
            async move {
                let message = inbound.message().await.ok()??;
                let response = match message.request? {
                    Phase::RequestHeaders(_) => answer,
                    Phase::ResponseHeaders(_) => {
                        wrap(Response::ResponseHeaders(HeadersResponse::default()))
                    }
                    Phase::RequestBody(_) => wrap(Response::RequestBody(BodyResponse::default())),
                    Phase::ResponseBody(_) => wrap(Response::ResponseBody(BodyResponse::default())),
                    Phase::RequestTrailers(_) => {
                        wrap(Response::RequestTrailers(TrailersResponse::default()))
                    }
                    Phase::ResponseTrailers(_) => {
                        wrap(Response::ResponseTrailers(TrailersResponse::default()))
                    }
                };
                Some((Ok(response), inbound))
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

fn wrap(response: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18090".into());
    let token = format!(
        "Bearer eyJhbGciOiJSUzI1NiJ9.{}.{}",
        "a".repeat(700),
        "s".repeat(342)
    );
    let answer = wrap(Response::RequestHeaders(HeadersResponse {
        response: Some(CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "authorization".into(),
                        value: String::new(),
                        raw_value: token.into_bytes(),
                    }),
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    ..Default::default()
                }],
                remove_headers: Vec::new(),
            }),
            ..Default::default()
        }),
    }));
    let router = tonic::transport::Server::builder()
        .add_service(ExternalProcessorServer::new(Floor { answer }));
    if let Some(path) = address.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        router
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    } else {
        let listener = tokio::net::TcpListener::bind(&address).await.unwrap();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        router.serve_with_incoming(incoming).await.unwrap();
    }
}
