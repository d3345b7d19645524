//! The processor run in-process through the library (`App::bind` and
//! `App::serve`: the `run` the binary calls, cut in two to read the bound
//! ports), on ephemeral loopback ports, with a tonic client.

use std::net::SocketAddr;
use std::path::Path;

use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use kube_audience_proxy::config::{Cli, Config};
use kube_audience_proxy::{App, RunError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// A processor served in-process.
pub struct InProcess {
    /// `IP:PORT` or `unix:PATH`.
    pub grpc: String,
    /// Admin listener.
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RunError>>>,
}

/// A tonic channel (TCP_NODELAY) to `target`: `IP:PORT` or `unix:PATH`.
pub async fn connect(target: &str) -> Channel {
    if let Some(path) = target.strip_prefix("unix:") {
        let path = path.to_owned();
        tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .unwrap()
    } else {
        tonic::transport::Endpoint::from_shared(format!("http://{target}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap()
    }
}

/// The grpc.health.v1 status of `service` ("" for the whole server).
pub async fn health_status(
    channel: Channel,
    service: &str,
) -> tonic_health::pb::health_check_response::ServingStatus {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    tonic_health::pb::health_check_response::ServingStatus::try_from(status).unwrap()
}

/// Parses the processor's command line as the binary would, with the
/// defaults the tests share (ServiceAccount `app` in `demo`, ephemeral ports,
/// no drain delay, local destinations allowed); `extra` flags come last and
/// win.
pub fn config(kubeconfig: &Path, extra: &[&str]) -> Config {
    let mut argv = vec![
        "kube-audience-proxy",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    argv.extend_from_slice(crate::support::COMMON_ARGS);
    argv.extend_from_slice(extra);
    Config::try_from(Cli::try_parse_from(argv).unwrap()).unwrap()
}

impl InProcess {
    /// Starts the processor for `config`.
    pub async fn start(config: Config) -> InProcess {
        let app = App::bind(config).await.unwrap();
        let grpc = app.grpc_address();
        let admin = app.admin_address().parse().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(async {
            let _ = stopped.await;
        }));
        InProcess {
            grpc,
            admin,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A tonic channel to the gRPC listener (TCP or Unix socket).
    pub async fn channel(&self) -> Channel {
        connect(&self.grpc).await
    }

    /// An ext_proc client.
    pub async fn client(&self) -> ExternalProcessorClient<Channel> {
        ExternalProcessorClient::new(self.channel().await)
    }

    /// Stops the server and waits for it (it must return Ok).
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A `request_headers` message like Envoy's: values only in `raw_value`.
pub fn request_headers(headers: &[(&str, &str)]) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Phase::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: headers
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).to_owned(),
                        value: String::new(),
                        raw_value: v.as_bytes().to_vec(),
                    })
                    .collect(),
            }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Headers of a GET through the forward proxy for `path`.
pub fn get(path: &str) -> ProcessingRequest {
    request_headers(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "upstream.test"),
        (":path", path),
        ("user-agent", "test"),
    ])
}

/// Sends one message on a new stream (as Envoy does per HTTP request) with
/// optional `x-kubernetes-audience` stream metadata, and returns the answer.
pub async fn process_one(
    client: &mut ExternalProcessorClient<Channel>,
    message: ProcessingRequest,
    metadata_audience: Option<&str>,
) -> Result<ProcessingResponse, tonic::Status> {
    let metadata: Vec<(&str, &str)> = metadata_audience
        .map(|aud| ("x-kubernetes-audience", aud))
        .into_iter()
        .collect();
    process_with(client, message, &metadata).await
}

/// Sends one message on a new stream with the given gRPC metadata.
pub async fn process_with(
    client: &mut ExternalProcessorClient<Channel>,
    message: ProcessingRequest,
    metadata: &[(&'static str, &str)],
) -> Result<ProcessingResponse, tonic::Status> {
    let mut request = tonic::Request::new(tokio_stream::iter(vec![message]));
    for (key, value) in metadata {
        request.metadata_mut().insert(*key, value.parse().unwrap());
    }
    let mut responses = client.process(request).await?.into_inner();
    match responses.message().await? {
        Some(response) => Ok(response),
        None => Err(tonic::Status::internal("stream ended without an answer")),
    }
}
