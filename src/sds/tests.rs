//! Tests of the SDS streams: delta answers, refusals, slots and rotation,
//! and pushes counted over real gRPC while the CA runs out.

use std::time::{Duration, SystemTime};

use super::*;

use super::certs::{MIN_ROTATION, ending_store, test_store as store};

fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn names(response: &DeltaDiscoveryResponse) -> (Vec<&str>, Vec<&str>) {
    (
        response.resources.iter().map(|r| r.name.as_str()).collect(),
        response
            .removed_resources
            .iter()
            .map(String::as_str)
            .collect(),
    )
}

#[tokio::test(start_paused = true)]
async fn delta_serves_refuses_bounds_and_rotates() {
    let certs = store(2);
    let mut stream = DeltaStream::new(Some(&certs), None);
    let first = stream
        .on_request(subscribe(&["localhost", "evil.test"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&first), (vec!["localhost"], vec!["evil.test"]));
    assert_eq!(first.nonce, "1");
    assert_eq!(first.type_url, Secret::type_url());
    let version = first.resources[0].version.clone();

    // An ACK (or a NACK) of that answer, and a repeated subscription,
    // need no answer.
    let ack = DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        response_nonce: "1".into(),
        ..Default::default()
    };
    assert!(stream.on_request(ack).await.unwrap().is_none());
    assert!(
        stream
            .on_request(subscribe(&["localhost"]))
            .await
            .unwrap()
            .is_none()
    );

    // Two names at most; unsubscribing frees a slot.
    let second = stream
        .on_request(subscribe(&["a.example.com", "b.example.com"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        names(&second),
        (vec!["a.example.com"], vec!["b.example.com"])
    );
    let unsubscribe = DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        resource_names_unsubscribe: vec!["a.example.com".into()],
        ..Default::default()
    };
    assert!(stream.on_request(unsubscribe).await.unwrap().is_none());
    let third = stream
        .on_request(subscribe(&["b.example.com"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&third), (vec!["b.example.com"], vec![]));

    // Nothing to rotate yet; after two thirds of the validity, every
    // subscribed secret is re-minted and pushed with a new version.
    assert!(stream.rotate().await.is_none());
    let due = stream.next_rotation().unwrap();
    tokio::time::advance(Duration::from_secs(16 * 3600 + 1)).await;
    assert!(Instant::now() >= due);
    let pushed = stream.rotate().await.unwrap();
    let mut pushed_names = names(&pushed).0;
    pushed_names.sort();
    assert_eq!(pushed_names, ["b.example.com", "localhost"]);
    let localhost = pushed
        .resources
        .iter()
        .find(|r| r.name == "localhost")
        .unwrap();
    assert_ne!(localhost.version, version);
    assert!(stream.rotate().await.is_none());
}

#[tokio::test]
async fn reconnects_resubscribe_through_initial_versions() {
    let certs = store(4);
    let mut stream = DeltaStream::new(Some(&certs), None);
    let request = DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        initial_resource_versions: [("localhost".to_owned(), "7".to_owned())].into(),
        ..Default::default()
    };
    let response = stream.on_request(request).await.unwrap().unwrap();
    assert_eq!(names(&response).0, ["localhost"]);
}

#[tokio::test]
async fn other_resource_types_are_an_error() {
    let certs = store(4);
    let mut stream = DeltaStream::new(Some(&certs), None);
    let request = DeltaDiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    };
    let status = stream.on_request(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn case_variants_in_one_stream_share_a_slot_and_keep_their_names() {
    let certs = store(1);
    let mut stream = DeltaStream::new(Some(&certs), None);
    let answer = stream
        .on_request(subscribe(&["LocalHost", "localhost.", "LOCALHOST"]))
        .await
        .unwrap()
        .unwrap();
    let (mut served, removed) = names(&answer);
    served.sort_unstable();
    assert_eq!(served, ["LOCALHOST", "LocalHost", "localhost."]);
    assert!(removed.is_empty());
    let versions: Vec<&str> = answer
        .resources
        .iter()
        .map(|r| r.version.as_str())
        .collect();
    assert!(versions.iter().all(|v| *v == versions[0]), "one leaf");
    // The one slot is taken: another name is refused, until every variant
    // is unsubscribed.
    let refused = stream
        .on_request(subscribe(&["a.example.com"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&refused), (vec![], vec!["a.example.com"]));
    let unsubscribe = |names: &[&str]| DeltaDiscoveryRequest {
        type_url: Secret::type_url(),
        resource_names_unsubscribe: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    };
    assert!(
        stream
            .on_request(unsubscribe(&["LocalHost", "LOCALHOST"]))
            .await
            .unwrap()
            .is_none()
    );
    let still = stream
        .on_request(subscribe(&["a.example.com"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&still).1, ["a.example.com"]);
    assert!(
        stream
            .on_request(unsubscribe(&["localhost."]))
            .await
            .unwrap()
            .is_none()
    );
    let served = stream
        .on_request(subscribe(&["a.example.com"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&served).0, ["a.example.com"]);
}

/// Drives a delta stream's rotation for `window` of (paused) time, the way
/// `serve_delta` does, and returns how many pushes it made. Bounded in
/// iterations too, so a rotation that is always due ends the test instead
/// of hanging it.
async fn pushes_within(stream: &mut DeltaStream<'_>, window: Duration) -> usize {
    let end = Instant::now() + window;
    let mut pushes = 0;
    for _ in 0..10_000 {
        let Some(at) = stream.next_rotation() else {
            break;
        };
        if at > end {
            break;
        }
        tokio::time::sleep_until(at).await;
        if stream.rotate().await.is_some() {
            pushes += 1;
        }
    }
    pushes
}

#[tokio::test(start_paused = true)]
async fn a_ca_near_its_end_is_not_rotated_in_a_loop() {
    // The CA ends in 5 s: every leaf is cut to at most 5 s. Rotation at two
    // thirds of that would push every few seconds (and, once the CA ran
    // out, without pause); it waits MIN_ROTATION instead.
    let certs = ending_store(10, SystemTime::now() + Duration::from_secs(5));
    let mut stream = DeltaStream::new(Some(&certs), None);
    let first = stream
        .on_request(subscribe(&["localhost"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&first).0, ["localhost"]);
    assert!(stream.next_rotation().unwrap() >= Instant::now() + MIN_ROTATION);
    let window = Duration::from_secs(600);
    let pushes = pushes_within(&mut stream, window).await;
    let bound = usize::try_from(window.as_secs() / MIN_ROTATION.as_secs()).unwrap();
    assert!(
        (1..=bound).contains(&pushes),
        "{pushes} pushes in {window:?}, at most one per {MIN_ROTATION:?}"
    );
    assert!(
        certs
            .counters
            .minted
            .load(std::sync::atomic::Ordering::Relaxed)
            <= 1 + bound as u64
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_ca_is_refused_not_rotated() {
    let certs = ending_store(10, SystemTime::now() - Duration::from_secs(1));
    let mut stream = DeltaStream::new(Some(&certs), None);
    let answer = stream
        .on_request(subscribe(&["localhost"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&answer), (vec![], vec!["localhost"]));
    assert_eq!(stream.next_rotation(), None, "nothing to rotate");
    assert_eq!(
        pushes_within(&mut stream, Duration::from_secs(600)).await,
        0
    );
}

/// Serves `certs` over real gRPC on loopback; the client channel and the
/// server task.
async fn serve(certs: Certificates) -> (tonic::transport::Channel, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sds = Sds::new(Arc::new(certs));
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(sds.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, server)
}

// Real time: the CA really runs out during the window. It lives 10 s, so
// the server, two streams and two signings are ready long before it ends
// even on a loaded machine; the count runs until 2 s after its end, over
// the last seconds of its life (where a leaf's life, and so two thirds of
// it, shrinks to zero) and past it.
#[tokio::test]
async fn pushes_over_grpc_stay_bounded_while_the_ca_runs_out() {
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

    let certs = ending_store(10, SystemTime::now() + Duration::from_secs(10));
    let ca_end = certs.ca_not_after();
    let (channel, server) = serve(certs).await;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (delta_tx, delta_rx) = mpsc::channel(4);
    delta_tx.send(subscribe(&["localhost"])).await.unwrap();
    let mut delta = client
        .delta_secrets(ReceiverStream::new(delta_rx))
        .await
        .unwrap()
        .into_inner();
    let (sotw_tx, sotw_rx) = mpsc::channel(4);
    sotw_tx
        .send(DiscoveryRequest {
            type_url: Secret::type_url(),
            resource_names: vec!["LocalHost".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut sotw = client
        .stream_secrets(ReceiverStream::new(sotw_rx))
        .await
        .unwrap()
        .into_inner();
    let deadline = std::time::Duration::from_secs(10);
    let first = tokio::time::timeout(deadline, delta.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(names(&first).0, ["localhost"], "served before the CA ended");
    let first = tokio::time::timeout(deadline, sotw.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.resources.len(), 1, "served before the CA ended");
    // Count what arrives until 2 s after the CA's end: nothing (no rotation
    // is due before MIN_ROTATION), where a rotation at two thirds of an
    // ever shorter life would send hundreds.
    let left = ca_end
        .duration_since(SystemTime::now())
        .expect("the streams were served before the CA ended");
    assert!(left < MIN_ROTATION, "the window ends before any rotation");
    let end = Instant::now() + left + Duration::from_secs(2);
    let (mut delta_pushes, mut sotw_pushes) = (0, 0);
    loop {
        tokio::select! {
            message = delta.message() => {
                message.unwrap().expect("the stream stays open");
                delta_pushes += 1;
            }
            message = sotw.message() => {
                message.unwrap().expect("the stream stays open");
                sotw_pushes += 1;
            }
            () = tokio::time::sleep_until(end) => break,
        }
    }
    assert!(
        SystemTime::now() > ca_end,
        "the window covered the CA's end"
    );
    assert_eq!((delta_pushes, sotw_pushes), (0, 0));
    drop((delta_tx, sotw_tx));
    server.abort();
}
