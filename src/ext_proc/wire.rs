//! The ext_proc gRPC service on the wire, with an encoder for the hot answer.
//!
//! Every answer is a `ProcessingResponse`. The common one, "continue, with
//! `authorization: Bearer <token>`", is written by hand: the token's
//! `HeaderValueOption` is encoded once per token ([`Token::encoded_with`])
//! and copied straight into the gRPC frame, so no request allocates or
//! builds a copy of the token. The bytes are exactly what prost would write
//! for the equivalent message ([`Answer::to_message`]; a test holds them
//! equal). Everything else goes through prost.
//!
//! [`ExtProcServer`] is the tower service tonic serves: the same routing as
//! the generated `ExternalProcessorServer`, with this codec.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest, ProcessingResponse,
    processing_response::Response,
};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len, message};
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::{Status, Streaming};

use super::ExtProc;
use super::response::overwrite;
use crate::secret::Token;
use crate::tokens::TokenSource;

/// The gRPC method this service serves.
const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";

/// One answer on a Process stream.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "the small variant is the hot one; boxing the other would add an allocation per answer"
)]
pub enum Answer {
    /// Any `ProcessingResponse`, encoded by prost.
    Message(ProcessingResponse),
    /// CONTINUE with the token set (and the audience markers removed).
    Inject(Injection),
}

/// The hot answer's parts.
#[derive(Debug)]
pub struct Injection {
    /// Header the token goes into (overwritten).
    pub header: Arc<str>,
    /// The token.
    pub token: Token,
    /// New `:path`, without the audience parameter.
    pub path: Option<Vec<u8>>,
    /// Header to remove (the audience header).
    pub remove: Option<Arc<str>>,
}

impl From<ProcessingResponse> for Answer {
    fn from(message: ProcessingResponse) -> Answer {
        Answer::Message(message)
    }
}

impl Injection {
    /// The token's `set_headers` entry (field 1 of `HeaderMutation`, key
    /// and length included), encoded once per token.
    fn token_entry(&self) -> &Bytes {
        self.token.encoded_with(|bearer| {
            let option = overwrite(&self.header, bearer.to_vec());
            let mut buf = Vec::with_capacity(message::encoded_len(1, &option));
            message::encode(1, &option, &mut buf);
            Bytes::from(buf)
        })
    }

    fn encode(self, buf: &mut impl BufMut) {
        let token = self.token_entry().clone();
        let path = self.path.map(|p| overwrite(":path", p));
        let path_len = path.as_ref().map_or(0, |o| message::encoded_len(1, o));
        let remove_len = self.remove.as_ref().map_or(0, |r| {
            key_len(2) + encoded_len_varint(r.len() as u64) + r.len()
        });
        // HeaderMutation { set_headers = 1, remove_headers = 2 }
        let mutation_len = token.len() + path_len + remove_len;
        // CommonResponse { status = 1 (CONTINUE = 0, omitted), header_mutation = 2 }
        let common_len = key_len(2) + encoded_len_varint(mutation_len as u64) + mutation_len;
        // HeadersResponse { response = 1 }
        let headers_len = key_len(1) + encoded_len_varint(common_len as u64) + common_len;
        // ProcessingResponse { request_headers = 1 }
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(headers_len as u64, buf);
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(common_len as u64, buf);
        encode_key(2, WireType::LengthDelimited, buf);
        encode_varint(mutation_len as u64, buf);
        buf.put_slice(&token);
        if let Some(path) = &path {
            message::encode(1, path, buf);
        }
        if let Some(remove) = &self.remove {
            encode_key(2, WireType::LengthDelimited, buf);
            encode_varint(remove.len() as u64, buf);
            buf.put_slice(remove.as_bytes());
        }
    }
}

impl Answer {
    /// The equivalent prost message (for tests and tools; the server never
    /// builds it for an injection).
    pub fn to_message(&self) -> ProcessingResponse {
        match self {
            Answer::Message(message) => message.clone(),
            Answer::Inject(injection) => {
                let mut set_headers = vec![overwrite(
                    &injection.header,
                    injection.token.bearer_header_value().to_vec(),
                )];
                if let Some(path) = &injection.path {
                    set_headers.push(overwrite(":path", path.clone()));
                }
                ProcessingResponse {
                    response: Some(Response::RequestHeaders(HeadersResponse {
                        response: Some(CommonResponse {
                            header_mutation: Some(HeaderMutation {
                                set_headers,
                                remove_headers: injection
                                    .remove
                                    .iter()
                                    .map(|r| r.to_string())
                                    .collect(),
                            }),
                            ..Default::default()
                        }),
                    })),
                    ..Default::default()
                }
            }
        }
    }

    /// Writes the protobuf encoding of this answer.
    pub fn encode(self, buf: &mut impl BufMut) {
        match self {
            Answer::Message(message) => {
                // EncodeBuf grows as needed; encode_raw cannot fail then.
                message.encode_raw(buf);
            }
            Answer::Inject(injection) => injection.encode(buf),
        }
    }
}

// === impl codec ===

/// Encodes [`Answer`]s, decodes `ProcessingRequest`s.
#[derive(Debug, Default, Clone, Copy)]
pub struct AnswerCodec;

/// The encoder half of [`AnswerCodec`].
#[derive(Debug, Default, Clone, Copy)]
pub struct AnswerEncoder;

impl Encoder for AnswerEncoder {
    type Item = Answer;
    type Error = Status;

    fn encode(&mut self, item: Answer, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst);
        Ok(())
    }
}

impl Codec for AnswerCodec {
    type Encode = Answer;
    type Decode = ProcessingRequest;
    type Encoder = AnswerEncoder;
    type Decoder = tonic_prost::ProstDecoder<ProcessingRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        AnswerEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

// === impl ExtProcServer ===

/// The tower service for `envoy.service.ext_proc.v3.ExternalProcessor`.
pub struct ExtProcServer<S> {
    processor: ExtProc<S>,
}

impl<S> Clone for ExtProcServer<S> {
    fn clone(&self) -> Self {
        ExtProcServer {
            processor: self.processor.clone(),
        }
    }
}

impl<S: TokenSource> ExtProcServer<S> {
    /// Serves `processor`.
    pub fn new(processor: ExtProc<S>) -> ExtProcServer<S> {
        ExtProcServer { processor }
    }
}

impl<S> tonic::server::NamedService for ExtProcServer<S> {
    const NAME: &'static str = "envoy.service.ext_proc.v3.ExternalProcessor";
}

struct ProcessMethod<S>(ExtProc<S>);

impl<S: TokenSource> tonic::server::StreamingService<ProcessingRequest> for ProcessMethod<S> {
    type Response = Answer;
    type ResponseStream = super::AnswerStream;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<ProcessingRequest>>) -> Self::Future {
        let processor = self.0.clone();
        Box::pin(async move { Ok(processor.process_stream(request)) })
    }
}

impl<S, B> Service<http::Request<B>> for ExtProcServer<S>
where
    S: TokenSource,
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != PROCESS_PATH {
            return Box::pin(
                async move { Ok(Status::unimplemented("unknown method").into_http()) },
            );
        }
        let method = ProcessMethod(self.processor.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(AnswerCodec);
            Ok(grpc.streaming(method, request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn injection(token: &str, path: Option<&str>, remove: Option<&str>) -> Injection {
        Injection {
            header: Arc::from("authorization"),
            token: Token::new(token.to_owned()).unwrap(),
            path: path.map(|p| p.as_bytes().to_vec()),
            remove: remove.map(Arc::from),
        }
    }

    #[test]
    fn hand_encoding_equals_prost() {
        let long = "x".repeat(5000);
        let cases = [
            injection("abc", None, None),
            injection("abc", Some("/p?x=1"), None),
            injection("abc", None, Some("x-kubernetes-audience")),
            injection(&long, Some(&"/".repeat(300)), Some("x-kubernetes-audience")),
            injection("eyJ.a.b", Some(""), Some("h")),
        ];
        for case in cases {
            let expected = Answer::Inject(Injection {
                header: case.header.clone(),
                token: case.token.clone(),
                path: case.path.clone(),
                remove: case.remove.clone(),
            })
            .to_message();
            let mut ours = Vec::new();
            Answer::Inject(case).encode(&mut ours);
            assert_eq!(ours, expected.encode_to_vec());
            assert_eq!(
                ProcessingResponse::decode(ours.as_slice()).unwrap(),
                expected
            );
        }
    }

    #[test]
    fn the_token_entry_is_built_once_and_shared() {
        let a = injection("abc", None, None);
        let first = a.token_entry().clone();
        let b = Injection {
            header: a.header.clone(),
            token: a.token.clone(),
            path: Some(b"/x".to_vec()),
            remove: None,
        };
        // Same backing memory: the second request reuses the first's bytes.
        assert_eq!(b.token_entry().as_ptr(), first.as_ptr());
    }
}
