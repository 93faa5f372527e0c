//! Bearer tokens stay where they belong: never in the log, at any level; as a cookie or query
//! parameter only where a browser's EventSource needs them (SSE and history reads), never on a
//! publish or a gRPC call.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header, encode};
use reqwest::StatusCode;
use support::{
    BrokerProcess, Sse, publish_request, scratch_dir, self_signed_certificate, spawn_broker_with,
    within,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;
use tonic::metadata::MetadataValue;
use topichub::proto::v1::pub_sub_client::PubSubClient;

const SECRET: &str = "tests-only secret, long enough for HS256 use";

/// An HS256 token that may publish and subscribe to everything.
fn token() -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({
        "sub": "tester",
        "exp": exp,
        "topichub": {"publish": [">"], "subscribe": [">"]},
    });
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn grpc_request<T>(message: T, metadata: (&'static str, String)) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = metadata.1.parse().unwrap();
    request.metadata_mut().insert(metadata.0, value);
    request
}

/// Every way a token may travel, on HTTP/1.1 (hyper and the SSE fast path), HTTP/2 and gRPC,
/// accepted or refused, with everything logged: the log never holds the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_log_at_any_level() {
    let broker = BrokerProcess::start(&["--jwt-secret", SECRET], "trace,h2=trace").await;
    let url = format!("http://{}", broker.addr);
    let token = token();
    let bearer = format!("Bearer {token}");

    // SSE over the HTTP/1.1 fast path, by query parameter and by cookie.
    let mut by_query = Sse::open(
        &url,
        &format!("/subscribe?topic=t&access_token={token}"),
        &[],
    )
    .await;
    by_query.expect("subscribed").await;
    let cookie = format!("access_token={token}");
    let mut by_cookie = Sse::open(&url, "/subscribe?topic=t", &[("cookie", &cookie)]).await;
    by_cookie.expect("subscribed").await;
    drop((by_query, by_cookie));

    for http in [
        reqwest::Client::new(),
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap(),
    ] {
        for (request, expected) in [
            (
                http.get(format!("{url}/topics/t/messages?access_token={token}")),
                StatusCode::OK,
            ),
            (
                http.post(format!("{url}/topics/t"))
                    .header("authorization", &bearer)
                    .body("x"),
                StatusCode::OK,
            ),
            // Refused, and logged as such: still without the token.
            (
                http.post(format!("{url}/topics/t?access_token={token}"))
                    .header("cookie", &cookie)
                    .body("x"),
                StatusCode::UNAUTHORIZED,
            ),
        ] {
            assert_eq!(request.send().await.unwrap().status(), expected);
        }
    }

    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = PubSubClient::new(channel);
    grpc.publish(grpc_request(
        publish_request("t", "x"),
        ("authorization", bearer.clone()),
    ))
    .await
    .unwrap();
    drop(grpc);

    let log = broker.stop().await;
    let signature = token.rsplit('.').next().unwrap();
    for (line_no, line) in log.lines().enumerate() {
        assert!(
            !line.contains(signature) && !line.contains(&token[..40]),
            "line {line_no} of the log holds the token: {line}"
        );
    }
    assert!(
        log.contains("access_token=[redacted]"),
        "the request URIs are logged, redacted"
    );
}

/// A cookie or query token is accepted only by the reads EventSource makes; a publish (CSRF:
/// a cross-site form sends cookies) or a gRPC call that brings one is refused with 401 /
/// UNAUTHENTICATED, naming the header to use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_and_query_tokens_only_where_eventsource_needs_them() {
    let broker = spawn_broker_with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let url = broker.url();
    let token = token();
    let cookie = format!("theme=dark; access_token={token}");
    let http = reqwest::Client::new();
    let json = serde_json::json!({"topic": "t", "payload": "x"});

    let refusals = [
        http.post(format!("{url}/publish"))
            .header("cookie", &cookie)
            .json(&json),
        http.post(format!("{url}/publish?access_token={token}"))
            .json(&json),
        http.post(format!("{url}/topics/t?access_token={token}"))
            .body("x"),
        http.post(format!("{url}/topics/t"))
            .header("cookie", &cookie)
            .body("x"),
        http.get(format!("{url}/topics?access_token={token}")),
    ];
    for request in refusals {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "UNAUTHENTICATED");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("authorization: Bearer"), "{message}");
    }

    // The raw publish as the first request of a fresh connection (the HTTP/1.1 lane's
    // opening) gets the same answer.
    let mut socket = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let request = format!(
        "POST /topics/t?access_token={token} HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = within("the answer", socket.read(&mut answer))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");

    // gRPC and gRPC-Web take the token from `authorization` metadata only.
    let mut grpc = broker.grpc().await;
    let mut web = support::grpc_web(&broker);
    let refused = grpc
        .publish(grpc_request(
            publish_request("t", "x"),
            ("cookie", cookie.clone()),
        ))
        .await
        .expect_err("a cookie is no gRPC credential");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("authorization: Bearer"),
        "{refused:?}"
    );
    let refused = web
        .publish(grpc_request(
            publish_request("t", "x"),
            ("cookie", cookie.clone()),
        ))
        .await
        .expect_err("a cookie is no gRPC-Web credential");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // Where EventSource needs them, they still work; a header wins over a stray cookie.
    let mut by_query = Sse::open(
        &url,
        &format!("/subscribe?topic=t&access_token={token}"),
        &[],
    )
    .await;
    by_query.expect("subscribed").await;
    let mut by_cookie = Sse::open(&url, "/subscribe?topic=t", &[("cookie", &cookie)]).await;
    by_cookie.expect("subscribed").await;
    let history = http
        .get(format!("{url}/topics/t/messages?access_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(history.status(), StatusCode::OK);
    let published = http
        .post(format!("{url}/publish"))
        .bearer_auth(&token)
        .header("cookie", &cookie)
        .json(&json)
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), StatusCode::OK);
    for sse in [&mut by_query, &mut by_cookie] {
        assert_eq!(sse.expect("message").await.json()["payload"], "x");
    }
    broker.stop().await;
}

/// A CA that signs client certificates.
struct ClientCa {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl ClientCa {
    fn new(name: &str) -> ClientCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        ClientCa {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A client certificate for `CN=common_name, O=Example`, with its key, in one PEM.
    fn client(&self, common_name: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        format!("{}{}", cert.pem(), key.serialize_pem())
    }
}

/// An HTTPS client trusting `server_pem`, presenting `identity` (certificate and key PEM).
fn https_client(server_pem: &str, identity: Option<&str>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(server_pem.as_bytes()).unwrap());
    if let Some(identity) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// `--tls-client-ca`: every door requires a certificate signed by that CA, the certificate's
/// subject is the client's name in limits, and with JWT keys too a client needs both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_client_certificate_on_every_door_and_names_the_client() {
    let dir = scratch_dir("mtls");
    let (server_pem, server_key) = self_signed_certificate();
    let ca = ClientCa::new("topichub test clients");
    let stranger = ClientCa::new("someone else");
    for (name, text) in [
        ("cert.pem", &server_pem),
        ("key.pem", &server_key),
        ("ca.pem", &ca.pem),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let broker = spawn_broker_with(|c| {
        c.tls_cert = Some(dir.join("cert.pem"));
        c.tls_key = Some(dir.join("key.pem"));
        c.tls_client_ca = Some(dir.join("ca.pem"));
        c.publish_rate = 1;
    })
    .await;
    let https = format!("https://localhost:{}", broker.addr.port());
    let alice = ca.client("alice");

    // HTTP (both versions), without a certificate or with one from another CA: no answer.
    for identity in [None, Some(stranger.client("mallory"))] {
        let client = https_client(&server_pem, identity.as_deref());
        let refused = client.get(format!("{https}/healthz")).send().await;
        assert!(refused.is_err(), "{refused:?}");
    }
    let client = https_client(&server_pem, Some(&alice));
    let healthz = client.get(format!("{https}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), StatusCode::OK);

    // The rate limit knows the client by its certificate's subject.
    let publish = || client.post(format!("{https}/topics/t")).body("x").send();
    assert_eq!(publish().await.unwrap().status(), StatusCode::OK);
    let limited = publish().await.unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let limited: serde_json::Value = limited.json().await.unwrap();
    let message = limited["error"]["message"].as_str().unwrap();
    assert!(message.contains("CN=alice"), "{message}");

    // gRPC: the same.
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&server_pem));
    let refused = async {
        let channel = Channel::from_shared(https.clone())
            .unwrap()
            .tls_config(tls.clone())
            .unwrap()
            .connect()
            .await?;
        PubSubClient::new(channel)
            .list_topics(topichub::proto::v1::ListTopicsRequest::default())
            .await
            .map_err(Into::into)
    };
    let refused: Result<_, Box<dyn std::error::Error>> = refused.await;
    assert!(refused.is_err(), "gRPC without a client certificate");
    let channel = Channel::from_shared(https.clone())
        .unwrap()
        .tls_config(tls.identity(Identity::from_pem(&alice, &alice)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    PubSubClient::new(channel)
        .list_topics(topichub::proto::v1::ListTopicsRequest::default())
        .await
        .unwrap();
    broker.stop().await;

    // With JWT keys too: the certificate and a token.
    let broker = spawn_broker_with(|c| {
        c.tls_cert = Some(dir.join("cert.pem"));
        c.tls_key = Some(dir.join("key.pem"));
        c.tls_client_ca = Some(dir.join("ca.pem"));
        c.jwt_secret = Some(SECRET.into());
    })
    .await;
    let https = format!("https://localhost:{}", broker.addr.port());
    let token = token();
    let with_certificate = https_client(&server_pem, Some(&alice));
    let no_token = with_certificate
        .get(format!("{https}/topics"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), StatusCode::UNAUTHORIZED);
    let both = with_certificate
        .get(format!("{https}/topics"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), StatusCode::OK);
    let no_certificate = https_client(&server_pem, None)
        .get(format!("{https}/topics"))
        .bearer_auth(&token)
        .send()
        .await;
    assert!(no_certificate.is_err(), "{no_certificate:?}");
    broker.stop().await;
}

/// An ES256 key pair: (private key PEM for signing, public key PEM for the broker).
fn es256_keys() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    (key.serialize_pem(), key.public_key_pem())
}

fn es256_token(private_pem: &str) -> String {
    let claims = serde_json::json!({"sub": "rotated", "topichub": {"subscribe": [">"]}});
    encode(
        &Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// SIGHUP reloads the TLS certificate and the JWT public key: new connections get the new
/// certificate, tokens of the new key are accepted and the old key's refused. A file that cannot
/// be used keeps the old keys, with a warning saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_certificate_and_jwt_keys_without_a_restart() {
    let dir = scratch_dir("rotation");
    let (cert1, key1) = self_signed_certificate();
    let (cert2, key2) = self_signed_certificate();
    let (sign1, verify1) = es256_keys();
    let (sign2, verify2) = es256_keys();
    let (cert, key, jwt) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("jwt.pem"),
    );
    std::fs::write(&cert, &cert1).unwrap();
    std::fs::write(&key, &key1).unwrap();
    std::fs::write(&jwt, &verify1).unwrap();
    let broker = BrokerProcess::start(
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--jwt-public-key",
            jwt.to_str().unwrap(),
        ],
        "info",
    )
    .await;
    let https = format!("https://localhost:{}", broker.addr.port());
    // A new client per check: a new connection, a new handshake.
    let status = |server_pem: &str, token: String| {
        let request = https_client(server_pem, None)
            .get(format!("{https}/topics"))
            .bearer_auth(token)
            .send();
        async move { request.await.map(|r| r.status()) }
    };
    assert_eq!(
        status(&cert1, es256_token(&sign1)).await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(
        status(&cert1, es256_token(&sign2)).await.unwrap(),
        StatusCode::UNAUTHORIZED
    );

    // Rotate: write the new files (each whole, as a deployment tool would), then SIGHUP.
    std::fs::write(&cert, &cert2).unwrap();
    std::fs::write(&key, &key2).unwrap();
    std::fs::write(&jwt, &verify2).unwrap();
    broker.signal("HUP");
    support::wait_for("the new certificate to be served", || {
        let check = status(&cert2, es256_token(&sign2));
        async move { matches!(check.await, Ok(StatusCode::OK)).then_some(()) }
    })
    .await;
    assert!(
        status(&cert1, es256_token(&sign2)).await.is_err(),
        "old certificate retired"
    );
    assert_eq!(
        status(&cert2, es256_token(&sign1)).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "old key's tokens refused"
    );

    // Broken files: the old keys stay, and the log says why.
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&jwt, "not a key").unwrap();
    broker.signal("HUP");
    support::wait_for("the reload to be refused", || async {
        let log = broker.log();
        (log.contains("keeping the old JWT keys")
            && log.contains("keeping the old TLS certificate"))
        .then_some(())
    })
    .await;
    assert_eq!(
        status(&cert2, es256_token(&sign2)).await.unwrap(),
        StatusCode::OK
    );
    let log = broker.stop().await;
    assert!(log.contains("jwt.pem"), "the warning names the file: {log}");
}
